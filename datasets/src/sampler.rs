//! [`GlobalBatchSampler`]: which windows each step, rank and micro-step trains on.

use std::sync::{Arc, Mutex};

use crate::DatasetError;
use crate::rng::SplitMix64;

/// The PRNG stream of the epoch permutations.
const EPOCH_DOMAIN: u64 = 1;

/// Deterministic global-batch sampler over fixed, non-overlapping windows of
/// `window` tokens: window `w` covers tokens `[w*window, (w+1)*window)` (a tail
/// shorter than a window is never sampled).
///
/// Epoch `e` is a permutation of all windows, drawn by Fisher–Yates with a
/// SplitMix64 seeded by `(seed, e)`, so it never changes with crate versions. The
/// epochs follow each other into one endless sequence of samples, and the global
/// batch of step `t` is samples `t*G..(t+1)*G` of it, `G` being the global batch
/// size. The batches depend only on `(num_tokens, window, G, seed)`: any world size,
/// partition size and accumulation count that multiply to the same `G` train on
/// the same samples ([`GlobalBatchSampler::micro_batch`] only slices them).
///
/// The two most recent epoch permutations are cached; the sampler is `Send + Sync`.
#[derive(Debug)]
pub struct GlobalBatchSampler {
    window: usize,
    num_windows: usize,
    global_batch: usize,
    seed: u64,
    cache: Mutex<Vec<(u64, Arc<Vec<u32>>)>>,
}

impl GlobalBatchSampler {
    /// A sampler over the `num_tokens / window` windows of a split.
    ///
    /// Fails when `window` or `global_batch` is zero, and with
    /// [`DatasetError::TooSmall`] when the split holds no whole window.
    pub fn new(
        num_tokens: usize,
        window: usize,
        global_batch: usize,
        seed: u64,
    ) -> Result<Self, DatasetError> {
        if window == 0 {
            return Err(DatasetError::Invalid("window of 0 tokens".into()));
        }
        if global_batch == 0 {
            return Err(DatasetError::Invalid("global batch of 0 samples".into()));
        }
        let num_windows = num_tokens / window;
        if num_windows == 0 {
            return Err(DatasetError::TooSmall { num_tokens, window });
        }
        if u32::try_from(num_windows).is_err() {
            return Err(DatasetError::Invalid(format!(
                "{num_windows} windows of {window} tokens: more than 2^32, use a larger window"
            )));
        }
        Ok(GlobalBatchSampler {
            window,
            num_windows,
            global_batch,
            seed,
            cache: Mutex::new(Vec::new()),
        })
    }

    /// The number of windows (samples per epoch).
    pub fn num_windows(&self) -> usize {
        self.num_windows
    }

    /// Tokens per window.
    pub fn window(&self) -> usize {
        self.window
    }

    /// The global batch size `G`.
    pub fn global_batch_size(&self) -> usize {
        self.global_batch
    }

    /// The seed of the epoch permutations.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The token range of window `w`: `[w*window, (w+1)*window)`.
    pub fn window_range(&self, w: usize) -> std::ops::Range<usize> {
        w * self.window..(w + 1) * self.window
    }

    /// Epochs completed before step `step` starts (fractional): `step*G / num_windows`.
    pub fn epoch(&self, step: u64) -> f64 {
        step as f64 * self.global_batch as f64 / self.num_windows as f64
    }

    /// The order of the windows in epoch `epoch`: a permutation of `0..num_windows()`.
    pub fn epoch_permutation(&self, epoch: u64) -> Vec<usize> {
        self.permutation(epoch)
            .iter()
            .map(|&w| w as usize)
            .collect()
    }

    fn permutation(&self, epoch: u64) -> Arc<Vec<u32>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = cache.iter().find(|(e, _)| *e == epoch) {
            return p.clone();
        }
        let mut rng = SplitMix64::for_item(self.seed, EPOCH_DOMAIN, epoch);
        let mut p: Vec<u32> = (0..self.num_windows as u32).collect();
        for i in (1..p.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        let p = Arc::new(p);
        if cache.len() >= 2 {
            cache.remove(0);
        }
        cache.push((epoch, p.clone()));
        p
    }

    /// The window indices of the global batch of step `step`: samples
    /// `step*G..(step+1)*G` of the endless epoch sequence (length `G`).
    pub fn global_batch(&self, step: u64) -> Vec<usize> {
        let n = self.num_windows as u128;
        let mut sample = u128::from(step) * self.global_batch as u128;
        let end = sample + self.global_batch as u128;
        let mut out = Vec::with_capacity(self.global_batch);
        while sample < end {
            let epoch = (sample / n) as u64;
            let pos = (sample % n) as usize;
            let take = ((end - sample) as usize).min(self.num_windows - pos);
            let p = self.permutation(epoch);
            out.extend(p[pos..pos + take].iter().map(|&w| w as usize));
            sample += take as u128;
        }
        out
    }

    /// The windows of micro-step `micro` (`0..accum`) of data-parallel rank `rank`
    /// (`0..world`) at step `step`: positions
    /// `[(rank*accum + micro)*b, (rank*accum + micro + 1)*b)` of
    /// [`global_batch(step)`](Self::global_batch), where the micro-batch
    /// `b = G / (world*accum)`.
    ///
    /// Fails unless `world * accum * b == G` for a whole `b`, `rank < world` and
    /// `micro < accum`.
    pub fn micro_batch(
        &self,
        step: u64,
        rank: usize,
        world: usize,
        accum: usize,
        micro: usize,
    ) -> Result<Vec<usize>, DatasetError> {
        let g = self.global_batch;
        if world == 0 || accum == 0 || !g.is_multiple_of(world * accum) {
            return Err(DatasetError::Invalid(format!(
                "global batch {g} is not world size {world} x accumulation steps {accum} x a whole micro-batch"
            )));
        }
        if rank >= world {
            return Err(DatasetError::Invalid(format!(
                "rank {rank} is not below the world size {world}"
            )));
        }
        if micro >= accum {
            return Err(DatasetError::Invalid(format!(
                "micro-step {micro} is not below the accumulation steps {accum}"
            )));
        }
        let b = g / (world * accum);
        let start = (rank * accum + micro) * b;
        let mut batch = self.global_batch(step);
        batch.truncate(start + b);
        Ok(batch.split_off(start))
    }
}
