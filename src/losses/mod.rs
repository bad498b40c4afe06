//! (placeholder: filled in by the losses work)
