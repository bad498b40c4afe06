//! (placeholder: filled in by the emulation work)
