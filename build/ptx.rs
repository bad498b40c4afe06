//! nvcc → PTX (owned by the CUDA backend work).
pub fn build() {}
