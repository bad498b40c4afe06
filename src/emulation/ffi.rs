//! Raw FFI to the host build of the kernels (`kernels/emulation/emulation_shims.cpp`). Each
//! `halo_emu_<kernel>(grid_x, block_x, args...)` runs that kernel's grid on the CPU and returns when
//! every block has finished. Argument lists are the kernels' own (kernels/README.md).

use half::{bf16, f16};

use crate::kernel_abi::{
    HaloClampParams, HaloDpoParams, HaloKtoParams, HaloSeqParams, HaloTokenParams,
};

macro_rules! token_ffi {
    ($t:ty, $fwd:ident, $bwd:ident, $inplace:ident) => {
        extern "C" {
            pub fn $fwd(
                grid_x: u32,
                block_x: u32,
                logits: *const $t,
                labels: *const i32,
                logp: *mut f32,
                lse: *mut f32,
                status: *mut i32,
                p: HaloTokenParams,
            );
            pub fn $bwd(
                grid_x: u32,
                block_x: u32,
                logits: *const $t,
                labels: *const i32,
                lse: *const f32,
                grad_logp: *const f32,
                grad_logits: *mut $t,
                status: *mut i32,
                p: HaloTokenParams,
            );
            pub fn $inplace(
                grid_x: u32,
                block_x: u32,
                logits: *mut $t,
                labels: *const i32,
                lse: *const f32,
                grad_logp: *const f32,
                status: *mut i32,
                p: HaloTokenParams,
            );
        }
    };
}

token_ffi!(
    f32,
    halo_emu_token_logprobs_forward_f32,
    halo_emu_token_logprobs_backward_f32,
    halo_emu_token_logprobs_backward_inplace_f32
);
token_ffi!(
    bf16,
    halo_emu_token_logprobs_forward_bf16,
    halo_emu_token_logprobs_backward_bf16,
    halo_emu_token_logprobs_backward_inplace_bf16
);
token_ffi!(
    f16,
    halo_emu_token_logprobs_forward_f16,
    halo_emu_token_logprobs_backward_f16,
    halo_emu_token_logprobs_backward_inplace_f16
);

extern "C" {
    pub fn halo_emu_sequence_sums_padded_f32(
        grid_x: u32,
        block_x: u32,
        values: *const f32,
        labels: *const i32,
        sums: *mut f32,
        counts: *mut u32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_sequence_sums_packed_f32(
        grid_x: u32,
        block_x: u32,
        values: *const f32,
        labels: *const i32,
        cu_seqlens: *const u32,
        sums: *mut f32,
        counts: *mut u32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_sequence_logratio_sums_padded_f32(
        grid_x: u32,
        block_x: u32,
        policy: *const f32,
        reference: *const f32,
        labels: *const i32,
        sums: *mut f32,
        counts: *mut u32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_sequence_logratio_sums_packed_f32(
        grid_x: u32,
        block_x: u32,
        policy: *const f32,
        reference: *const f32,
        labels: *const i32,
        cu_seqlens: *const u32,
        sums: *mut f32,
        counts: *mut u32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_broadcast_sequence_grad_padded_f32(
        grid_x: u32,
        block_x: u32,
        grad_seq: *const f32,
        labels: *const i32,
        token_grad: *mut f32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_broadcast_sequence_grad_packed_f32(
        grid_x: u32,
        block_x: u32,
        grad_seq: *const f32,
        labels: *const i32,
        cu_seqlens: *const u32,
        token_grad: *mut f32,
        p: HaloSeqParams,
    );
    pub fn halo_emu_humanline_grad_mask_f32(
        grid_x: u32,
        block_x: u32,
        policy: *const f32,
        reference: *const f32,
        token_grad: *mut f32,
        p: HaloClampParams,
    );
    pub fn halo_emu_kto_loss_f32(
        grid_x: u32,
        block_x: u32,
        policy_logp: *const f32,
        reference_logp: *const f32,
        desirable: *const u8,
        kl_policy: *const f32,
        kl_reference: *const f32,
        grad_policy: *mut f32,
        out: *mut f32,
        p: HaloKtoParams,
    );
    pub fn halo_emu_dpo_loss_f32(
        grid_x: u32,
        block_x: u32,
        policy_chosen: *const f32,
        policy_rejected: *const f32,
        reference_chosen: *const f32,
        reference_rejected: *const f32,
        chosen_counts: *const u32,
        rejected_counts: *const u32,
        grad_chosen: *mut f32,
        grad_rejected: *mut f32,
        out: *mut f32,
        status: *mut i32,
        p: HaloDpoParams,
    );
    pub fn halo_emu_float2bfloat16_rn(x: f32) -> u16;
    pub fn halo_emu_bfloat162float(x: u16) -> f32;
    pub fn halo_emu_float2half_rn(x: f32) -> u16;
    pub fn halo_emu_half2float(x: u16) -> f32;
    pub fn halo_emu_warp_selftest(grid_x: u32, block_x: u32, out: *mut i32);
    pub fn halo_emu_abi_query(name: *const std::ffi::c_char) -> i64;
    pub fn halo_emu_token_rows_per_block(vocab: i64) -> i32;
}
