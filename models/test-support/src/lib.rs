//! What the model crates' tests share (a dev-dependency only): the lock that
//! lets seeded tests take turns on the backend's process-global generator,
//! every parameter's path, fresh scratch directories, and the check that one
//! backward pass reaches every parameter.
//!
//! The tests run on `Autodiff<Plain<NdArray>>` (crates/plain); these helpers
//! are generic over the backend.

#![warn(missing_docs)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

/// NdArray's random generator is process-global: the tests that draw from it
/// (weight initialisation, dropout masks) hold this lock so that seeded runs
/// are reproducible when the tests of one binary share a process
/// (`cargo test`). One lock per test binary.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every float parameter's path (`transformer.h.0.attn.c_attn.weight`, ...),
/// in visiting order.
pub fn param_paths<B: Backend, M: Module<B>>(module: &M) -> Vec<String> {
    struct Paths {
        stack: Vec<String>,
        found: Vec<String>,
    }
    impl<B: Backend> ModuleVisitor<B> for Paths {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            self.found.push(self.stack.join("."));
        }
    }
    let mut paths = Paths {
        stack: Vec::new(),
        found: Vec::new(),
    };
    module.visit(&mut paths);
    paths.found
}

/// A path under the temporary directory that does not exist yet:
/// `mics-{tag}-{name}-{pid}-{n}`, `n` counting the calls of this process.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mics-{tag}-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Checks that `grads` (one backward pass) hold a finite gradient with a
/// nonzero element for every float parameter of `module`, and returns the
/// number of parameter elements visited (compare with `num_params()`).
///
/// Panics, naming the parameter's shape, on a missing, non-finite or zero
/// gradient.
pub fn assert_every_parameter_has_a_gradient<A: AutodiffBackend, M: Module<A>>(
    module: &M,
    grads: &A::Gradients,
) -> usize {
    struct Check<'a, A: AutodiffBackend> {
        grads: &'a A::Gradients,
        seen: usize,
    }
    impl<A: AutodiffBackend> ModuleVisitor<A> for Check<'_, A> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            let grad = param
                .val()
                .grad(self.grads)
                .expect("a parameter has no gradient");
            let values: Vec<f32> = grad
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 values");
            assert!(
                values.iter().all(|v| v.is_finite()),
                "non-finite gradient for a parameter of shape {:?}",
                param.dims()
            );
            let norm: f32 = values.iter().map(|v| v.abs()).sum();
            assert!(
                norm > 0.0,
                "zero gradient for a parameter of shape {:?}",
                param.dims()
            );
            self.seen += param.val().shape().num_elements();
        }
    }
    let mut check = Check::<A> { grads, seen: 0 };
    module.visit(&mut check);
    check.seen
}
