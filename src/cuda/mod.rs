//! (placeholder: filled in by the cuda work)
