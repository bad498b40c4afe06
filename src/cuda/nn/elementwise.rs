//! (to be written: the CUDA twin of halo-train's `elementwise`.)
