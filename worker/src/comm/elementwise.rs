//! Element-wise reduction kernels over raw byte buffers, used by the TCP ring (and by
//! tests as the naive reference). The contract lives in `comm/mod.rs` (`ReduceOp`):
//! - `Sum` adds; for bf16/f16 each addition is done in f32 and rounded back to the
//!   tensor's dtype at every ring step (the same rounding as a torch bf16 `add`), so a
//!   16-bit sum over `n` ranks is rounded `n - 1` times.
//! - `Avg` is `Sum` followed by one division by the world size, done by the rank that
//!   owns the chunk (in f32 for 16-bit dtypes, then rounded once); integers reject `Avg`.
//! - `Max` keeps the larger value and propagates NaN (like `torch.maximum`).

use super::ReduceOp;
use half::{bf16, f16};
use tch::Kind;

/// The element types the TCP ring can reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    F32,
    F64,
    BF16,
    F16,
    I32,
    I64,
}

impl ElemKind {
    /// The ring's element type for a tch kind, or `None` when unsupported.
    pub fn from_kind(kind: Kind) -> Option<ElemKind> {
        match kind {
            Kind::Float => Some(ElemKind::F32),
            Kind::Double => Some(ElemKind::F64),
            Kind::BFloat16 => Some(ElemKind::BF16),
            Kind::Half => Some(ElemKind::F16),
            Kind::Int => Some(ElemKind::I32),
            Kind::Int64 => Some(ElemKind::I64),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemKind::BF16 | ElemKind::F16 => 2,
            ElemKind::F32 | ElemKind::I32 => 4,
            ElemKind::F64 | ElemKind::I64 => 8,
        }
    }

    /// A stable one-byte code, exchanged in collective headers.
    pub fn code(self) -> u8 {
        match self {
            ElemKind::F32 => 1,
            ElemKind::F64 => 2,
            ElemKind::BF16 => 3,
            ElemKind::F16 => 4,
            ElemKind::I32 => 5,
            ElemKind::I64 => 6,
        }
    }

    /// Whether `op` is defined for this type (integers have no `Avg`).
    pub fn supports(self, op: ReduceOp) -> bool {
        !(op == ReduceOp::Avg && matches!(self, ElemKind::I32 | ElemKind::I64))
    }
}

/// An element type with the reduction arithmetic of the module contract.
trait Element: Copy {
    fn add(a: Self, b: Self) -> Self;
    fn max(a: Self, b: Self) -> Self;
    fn div(a: Self, n: usize) -> Self;
}

fn float_max<T: PartialOrd + Copy>(a: T, b: T, a_is_nan: bool) -> T {
    if a_is_nan || a > b { a } else { b }
}

impl Element for f32 {
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
    fn max(a: Self, b: Self) -> Self {
        float_max(a, b, a.is_nan())
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as f32
    }
}

impl Element for f64 {
    fn add(a: Self, b: Self) -> Self {
        a + b
    }
    fn max(a: Self, b: Self) -> Self {
        float_max(a, b, a.is_nan())
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as f64
    }
}

impl Element for bf16 {
    fn add(a: Self, b: Self) -> Self {
        bf16::from_f32(a.to_f32() + b.to_f32())
    }
    fn max(a: Self, b: Self) -> Self {
        float_max(a, b, a.is_nan())
    }
    fn div(a: Self, n: usize) -> Self {
        bf16::from_f32(a.to_f32() / n as f32)
    }
}

impl Element for f16 {
    fn add(a: Self, b: Self) -> Self {
        f16::from_f32(a.to_f32() + b.to_f32())
    }
    fn max(a: Self, b: Self) -> Self {
        float_max(a, b, a.is_nan())
    }
    fn div(a: Self, n: usize) -> Self {
        f16::from_f32(a.to_f32() / n as f32)
    }
}

impl Element for i32 {
    fn add(a: Self, b: Self) -> Self {
        a.wrapping_add(b)
    }
    fn max(a: Self, b: Self) -> Self {
        Ord::max(a, b)
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as i32
    }
}

impl Element for i64 {
    fn add(a: Self, b: Self) -> Self {
        a.wrapping_add(b)
    }
    fn max(a: Self, b: Self) -> Self {
        Ord::max(a, b)
    }
    fn div(a: Self, n: usize) -> Self {
        a / n as i64
    }
}

/// Views `bytes` as elements of `T`; `None` if misaligned or of a ragged length.
fn typed<T>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: every bit pattern is a valid value of the plain-old-data element types used
    // here (f32, f64, bf16, f16, i32, i64); `align_to` only yields a middle slice that is
    // correctly aligned, and we require the whole buffer to be that middle slice.
    let (head, body, tail) = unsafe { bytes.align_to::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(body)
}

fn typed_mut<T>(bytes: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: as in `typed`: plain-old-data element types, alignment checked by `align_to`.
    let (head, body, tail) = unsafe { bytes.align_to_mut::<T>() };
    (head.is_empty() && tail.is_empty()).then_some(body)
}

/// `acc[i] = f(acc[i], incoming[i])`; generic over `f` so each op is inlined and the
/// loop vectorises (a function pointer here made reductions several times slower).
#[inline(always)]
fn zip_in_place<T: Copy>(acc: &mut [T], incoming: &[T], f: impl Fn(T, T) -> T) {
    for (a, &b) in acc.iter_mut().zip(incoming) {
        *a = f(*a, b);
    }
}

#[inline(always)]
fn zip_in_place_and_copy<T: Copy>(
    acc: &mut [T],
    incoming: &[T],
    copy: &mut [T],
    f: impl Fn(T, T) -> T,
) {
    for ((a, &b), c) in acc.iter_mut().zip(incoming).zip(copy.iter_mut()) {
        *a = f(*a, b);
        *c = *a;
    }
}

#[inline(always)]
fn zip_into<T: Copy>(dst: &mut [T], local: &[T], incoming: &[T], f: impl Fn(T, T) -> T) {
    for (d, (&a, &b)) in dst.iter_mut().zip(local.iter().zip(incoming)) {
        *d = f(a, b);
    }
}

fn reduce_in_place_typed<T: Element>(op: ReduceOp, acc: &mut [u8], incoming: &[u8]) -> bool {
    let (Some(acc), Some(incoming)) = (typed_mut::<T>(acc), typed::<T>(incoming)) else {
        return false;
    };
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_in_place(acc, incoming, T::add),
        ReduceOp::Max => zip_in_place(acc, incoming, T::max),
    }
    true
}

fn reduce_local_first_typed<T: Element>(op: ReduceOp, acc: &mut [u8], local: &[u8]) -> bool {
    let (Some(acc), Some(local)) = (typed_mut::<T>(acc), typed::<T>(local)) else {
        return false;
    };
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_in_place(acc, local, |a, l| T::add(l, a)),
        ReduceOp::Max => zip_in_place(acc, local, |a, l| T::max(l, a)),
    }
    true
}

fn reduce_in_place_and_copy_typed<T: Element>(
    op: ReduceOp,
    acc: &mut [u8],
    incoming: &[u8],
    copy: &mut [u8],
) -> bool {
    let (Some(acc), Some(incoming), Some(copy)) = (
        typed_mut::<T>(acc),
        typed::<T>(incoming),
        typed_mut::<T>(copy),
    ) else {
        return false;
    };
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_in_place_and_copy(acc, incoming, copy, T::add),
        ReduceOp::Max => zip_in_place_and_copy(acc, incoming, copy, T::max),
    }
    true
}

fn reduce_into_typed<T: Element>(
    op: ReduceOp,
    dst: &mut [u8],
    local: &[u8],
    incoming: &[u8],
) -> bool {
    let (Some(dst), Some(local), Some(incoming)) =
        (typed_mut::<T>(dst), typed::<T>(local), typed::<T>(incoming))
    else {
        return false;
    };
    match op {
        ReduceOp::Sum | ReduceOp::Avg => zip_into(dst, local, incoming, T::add),
        ReduceOp::Max => zip_into(dst, local, incoming, T::max),
    }
    true
}

fn divide_typed<T: Element>(buf: &mut [u8], world: usize) -> bool {
    let Some(buf) = typed_mut::<T>(buf) else {
        return false;
    };
    for x in buf.iter_mut() {
        *x = T::div(*x, world);
    }
    true
}

macro_rules! dispatch {
    ($kind:expr, $f:ident ( $($arg:expr),* )) => {
        match $kind {
            ElemKind::F32 => $f::<f32>($($arg),*),
            ElemKind::F64 => $f::<f64>($($arg),*),
            ElemKind::BF16 => $f::<bf16>($($arg),*),
            ElemKind::F16 => $f::<f16>($($arg),*),
            ElemKind::I32 => $f::<i32>($($arg),*),
            ElemKind::I64 => $f::<i64>($($arg),*),
        }
    };
}

/// `acc[i] = op(acc[i], incoming[i])`. Returns false if a buffer is misaligned for
/// `kind` or the lengths differ.
pub fn reduce_in_place(kind: ElemKind, op: ReduceOp, acc: &mut [u8], incoming: &[u8]) -> bool {
    acc.len() == incoming.len() && dispatch!(kind, reduce_in_place_typed(op, acc, incoming))
}

/// `acc[i] = op(acc[i], incoming[i])` and `copy[i] = acc[i]` in one pass (the
/// shared-memory all-reduce keeps the result and publishes it). Returns false on
/// misalignment or length mismatch.
pub fn reduce_in_place_and_copy(
    kind: ElemKind,
    op: ReduceOp,
    acc: &mut [u8],
    incoming: &[u8],
    copy: &mut [u8],
) -> bool {
    acc.len() == incoming.len()
        && acc.len() == copy.len()
        && dispatch!(
            kind,
            reduce_in_place_and_copy_typed(op, acc, incoming, copy)
        )
}

/// `acc[i] = op(local[i], acc[i])`: the ring's operand order (`local` first) when the
/// accumulated value is the destination. Returns false on misalignment or length mismatch.
pub fn reduce_local_first(kind: ElemKind, op: ReduceOp, acc: &mut [u8], local: &[u8]) -> bool {
    acc.len() == local.len() && dispatch!(kind, reduce_local_first_typed(op, acc, local))
}

/// `dst[i] = op(local[i], incoming[i])`. Returns false on misalignment or length mismatch.
pub fn reduce_into(
    kind: ElemKind,
    op: ReduceOp,
    dst: &mut [u8],
    local: &[u8],
    incoming: &[u8],
) -> bool {
    dst.len() == local.len()
        && local.len() == incoming.len()
        && dispatch!(kind, reduce_into_typed(op, dst, local, incoming))
}

/// `buf[i] /= world` (the second half of `Avg`). Returns false on misalignment.
pub fn divide(kind: ElemKind, buf: &mut [u8], world: usize) -> bool {
    dispatch!(kind, divide_typed(buf, world))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
        // SAFETY: reading plain-old-data values as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
            .to_vec()
    }

    fn bytes_mut<T: Copy>(v: &mut [T]) -> &mut [u8] {
        let len = std::mem::size_of_val(v);
        // SAFETY: viewing a live slice of plain-old-data values as its bytes.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
    }

    #[test]
    fn f32_sum_max_avg() {
        let mut acc = vec![1.0f32, -2.0, 3.5];
        let inc = [0.5f32, -4.0, f32::NAN];
        assert!(reduce_in_place(
            ElemKind::F32,
            ReduceOp::Max,
            bytes_mut(&mut acc),
            &bytes_of(&inc)
        ));
        assert_eq!(acc[0], 1.0);
        assert_eq!(acc[1], -2.0);
        assert!(acc[2].is_nan(), "max propagates NaN");

        let mut out = vec![0.0f32; 2];
        let (local, inc) = ([1.0f32, 2.0], [3.0f32, 4.0]);
        assert!(reduce_into(
            ElemKind::F32,
            ReduceOp::Sum,
            bytes_mut(&mut out),
            &bytes_of(&local),
            &bytes_of(&inc)
        ));
        assert!(divide(ElemKind::F32, bytes_mut(&mut out), 4));
        assert_eq!(out, vec![1.0, 1.5]);
    }

    #[test]
    fn bf16_sum_rounds_each_step() {
        // 256 + 1 is not representable in bf16 (8 mantissa bits): it rounds to 256.
        let mut acc = vec![bf16::from_f32(256.0)];
        let inc = [bf16::from_f32(1.0)];
        assert!(reduce_in_place(
            ElemKind::BF16,
            ReduceOp::Sum,
            bytes_mut(&mut acc),
            &bytes_of(&inc)
        ));
        assert_eq!(acc[0].to_f32(), 256.0);
    }

    #[test]
    fn rejects_mismatched_lengths_and_integer_avg() {
        let mut acc = vec![0u8; 8];
        assert!(!reduce_in_place(
            ElemKind::F32,
            ReduceOp::Sum,
            &mut acc,
            &[0u8; 4]
        ));
        assert!(!ElemKind::I64.supports(ReduceOp::Avg));
        assert!(ElemKind::I64.supports(ReduceOp::Max));
    }
}
