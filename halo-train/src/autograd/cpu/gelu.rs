//! GELU, tanh approximation (GPT-2's `gelu_new`, PyTorch `gelu(approximate="tanh")`):
//! `y = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.

use rayon::prelude::*;

use super::simd::avx2_twin;
use halo_kernels::cpu::fast_exp::fast_exp;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const CUBIC: f32 = 0.044_715;
const CHUNK: usize = 4096;

/// `tanh(u) = 1 − 2/(e^{2u} + 1)` with the crate's vectorizable exp: libm's `tanhf` is a call
/// per element and dominated the whole training step. Absolute error ≈ 1e-7; saturates to ±1.
#[inline(always)]
fn fast_tanh(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0)
}

/// `y = gelu(x)` element-wise (tanh approximation, see the module docs); `x` and `y` have the
/// same length. Overwrites `y` (unlike the backward, which accumulates).
pub fn gelu_forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| forward_chunk(xc, yc));
}

avx2_twin! {
    fn forward_chunk(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            let t = fast_tanh(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
            *o = 0.5 * v * (1.0 + t);
        }
    }
}

/// `dx += dy · y'(x)` with `y'(x) = ½(1 + t) + ½ x (1 − t²) √(2/π) (1 + 3·0.044715 x²)`.
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dc, (xc, gc))| backward_chunk(xc, gc, dc));
}

avx2_twin! {
    fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let t = fast_tanh(SQRT_2_OVER_PI * (v + CUBIC * v * v * v));
            let inner_grad = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * v * v);
            *d += g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * inner_grad);
        }
    }
}
