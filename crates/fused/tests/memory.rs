//! The logits never exist whole: a counting allocator measures the peak of
//! live heap bytes during the fused forward and backward passes, which
//! stays far below the `T · V · 4` bytes of the logits when the chunk is
//! much smaller than `T`. One test only: the counter is process-wide.

/// The autodiff backend of the fused op (and of the unfused comparison).
// Plain: plain Burn, an autodiff backend under Burn's distributed autodiff too.
type Ref = Autodiff<mics_plain::Plain<NdArray>>;

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::{Autodiff, NdArray};
use common::{Problem, unfused, values};
use mics_fused::{CrossEntropyOptions, linear_cross_entropy};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(live, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak live heap bytes above the level at the start, while `f` runs.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    (r, PEAK.load(Ordering::Relaxed) - base)
}

#[test]
fn logits_never_exist_whole() {
    let (t, h, v, chunk) = (1024, 32, 8192, 32);
    let logits_bytes = t * v * 4; // 32 MiB
    let p = Problem::random(1, t, h, v, 0.1, true, 3.0);
    let device = Default::default();
    let options = CrossEntropyOptions::default().with_chunk_tokens(chunk);

    // Inputs built before measuring.
    let hidden = p.hidden::<Ref>(&device).require_grad();
    let weight = p.weight::<Ref>(&device).require_grad();
    let targets = p.targets::<Ref>(&device);
    let token_weights = p.token_weights::<Ref>(&device);
    let (grads, peak) = peak_during(|| {
        let loss = linear_cross_entropy(
            hidden.clone(),
            weight.clone(),
            None,
            targets,
            token_weights,
            &options,
        );
        loss.backward()
    });
    // The gradients (T·H + V·H floats), one [chunk, V] block, the GEMMs'
    // packing buffers (`gemm` packs a whole operand: at most a copy of the
    // weight, V·H, or of the chunk block), small buffers.
    let chunk_bytes = chunk * v * 4;
    let grad_bytes = (t * h + v * h) * 4;
    let packing_bytes = (v * h).max(chunk * v) * 4;
    println!(
        "fused forward + backward: peak {peak} bytes above the inputs; logits would be {logits_bytes}, one chunk is {chunk_bytes}, the gradients {grad_bytes}"
    );
    assert!(
        peak < logits_bytes / 4,
        "peak {peak} bytes, logits {logits_bytes}"
    );
    assert!(
        peak < 2 * chunk_bytes + 2 * grad_bytes + 2 * packing_bytes + (1 << 20),
        "{peak}"
    );
    assert_eq!(values(hidden.grad(&grads).unwrap()).len(), t * h);
    drop(grads);

    // The counter does see whole logits: the unfused path holds several.
    let (_, unfused_peak) = peak_during(|| unfused::<Ref>(&p));
    println!("unfused forward + backward: peak {unfused_peak} bytes");
    assert!(unfused_peak >= logits_bytes, "{unfused_peak}");
}
