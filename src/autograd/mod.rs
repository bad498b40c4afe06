//! (placeholder: filled in by the autograd work)
