//! Training batches built from sampled windows: causal LM ([`lm_batch`]) and
//! BERT masked LM ([`mlm_batch`]).

use crate::rng::SplitMix64;
use crate::{DatasetError, SpecialTokens, TokenFile};

/// The label of positions that do not count in the masked-LM loss (PyTorch's and
/// Hugging Face's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The fraction of the non-special positions of a sequence selected for masked LM.
pub const MLM_SELECT_FRACTION: f64 = 0.15;

/// The PRNG stream of the masking.
const MLM_DOMAIN: u64 = 2;

/// A causal-LM batch, row-major `[batch, seq_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LmBatch {
    /// The input ids: the first `seq_len` tokens of each window.
    pub inputs: Vec<u32>,
    /// The target ids: the last `seq_len` tokens of each window (inputs shifted by one).
    pub targets: Vec<u32>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq_len: usize,
}

/// The causal-LM batch of `windows`, each of `seq_len + 1` tokens (window `w`
/// covers tokens `[w*(seq_len+1), (w+1)*(seq_len+1))`, so sample the windows with
/// a [`crate::GlobalBatchSampler`] of window `seq_len + 1`): inputs are the first
/// `seq_len` tokens, targets the last `seq_len`.
///
/// # Panics
///
/// When a window lies beyond the end of `tokens`.
pub fn lm_batch(tokens: &TokenFile, windows: &[usize], seq_len: usize) -> LmBatch {
    let span = seq_len + 1;
    let mut inputs = Vec::with_capacity(windows.len() * seq_len);
    let mut targets = Vec::with_capacity(windows.len() * seq_len);
    for &w in windows {
        let ids = tokens.get(w * span..(w + 1) * span);
        inputs.extend_from_slice(&ids[..seq_len]);
        targets.extend_from_slice(&ids[1..]);
    }
    LmBatch {
        inputs,
        targets,
        batch: windows.len(),
        seq_len,
    }
}

/// A BERT masked-LM batch, row-major `[batch, seq_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlmBatch {
    /// `[CLS] window [SEP]`, with the selected positions masked or replaced.
    pub input_ids: Vec<u32>,
    /// The original id at selected positions, [`IGNORE_INDEX`] (-100) elsewhere.
    pub labels: Vec<i64>,
    /// Rows.
    pub batch: usize,
    /// Columns.
    pub seq_len: usize,
    /// The number of selected positions (labels other than [`IGNORE_INDEX`]).
    pub masked: usize,
}

/// The masked-LM batch of `windows`, each of `seq_len - 2` tokens (window `w`
/// covers tokens `[w*(seq_len-2), (w+1)*(seq_len-2))`, so sample the windows with a
/// [`crate::GlobalBatchSampler`] of window `seq_len - 2`), wrapped as
/// `[CLS] window [SEP]`.
///
/// In each sequence, `max(1, round(15%))` of the positions whose token is not a
/// special token (`[CLS]`, `[SEP]`, the document separators inside the window,
/// `[MASK]`, `[PAD]`, `<|endoftext|>`) are selected uniformly without replacement
/// (none if there is no such position). Each selected position independently
/// becomes `[MASK]` with probability 80%, a uniformly random non-special id in
/// `0..vocab_size` with 10%, and stays as it is with 10%. `labels` holds the
/// original id at selected positions and [`IGNORE_INDEX`] elsewhere.
///
/// The masking of a window depends only on `(seed, window index)`, through a
/// SplitMix64 stream, never on its position in the batch, the rank or the step:
/// a sample is masked identically on every topology.
///
/// Fails when `seq_len < 3`, when `special` lacks `[CLS]`, `[SEP]` or `[MASK]`,
/// when every id of the vocabulary is special, and with
/// [`DatasetError::TokenOutOfRange`] when a window holds an id `>= vocab_size`.
///
/// # Panics
///
/// When a window lies beyond the end of `tokens`.
pub fn mlm_batch(
    tokens: &TokenFile,
    windows: &[usize],
    seq_len: usize,
    special: &SpecialTokens,
    vocab_size: usize,
    seed: u64,
) -> Result<MlmBatch, DatasetError> {
    if seq_len < 3 {
        return Err(DatasetError::Invalid(format!(
            "masked-LM sequence length {seq_len} leaves no room between [CLS] and [SEP]"
        )));
    }
    let missing = |token, key| DatasetError::MissingSpecial {
        purpose: "masked LM",
        token,
        key,
    };
    let cls = special.cls.ok_or_else(|| missing("[CLS]", "cls"))?;
    let sep = special.sep.ok_or_else(|| missing("[SEP]", "sep"))?;
    let mask = special.mask.ok_or_else(|| missing("[MASK]", "mask"))?;
    let specials_in_vocab = special
        .ids()
        .iter()
        .filter(|&&id| (id as usize) < vocab_size)
        .count();
    if specials_in_vocab >= vocab_size {
        return Err(DatasetError::Invalid(format!(
            "vocabulary of {vocab_size} ids has no non-special token to draw replacements from"
        )));
    }
    let span = seq_len - 2;
    let mut input_ids = Vec::with_capacity(windows.len() * seq_len);
    let mut labels = Vec::with_capacity(windows.len() * seq_len);
    let mut masked = 0;
    for &w in windows {
        let start = w * span;
        let body = tokens.get(start..start + span);
        check_vocab(tokens, start, &body, vocab_size)?;
        let row = input_ids.len();
        input_ids.push(cls);
        input_ids.extend_from_slice(&body);
        input_ids.push(sep);
        labels.resize(row + seq_len, IGNORE_INDEX);

        let mut candidates: Vec<usize> = (1..=span)
            .filter(|&i| !special.contains(input_ids[row + i]))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let n = ((candidates.len() as f64 * MLM_SELECT_FRACTION).round() as usize)
            .clamp(1, candidates.len());
        let mut rng = SplitMix64::for_item(seed, MLM_DOMAIN, w as u64);
        for k in 0..n {
            // Partial Fisher–Yates: candidates[..=k] are the selected positions.
            let j = k + rng.below((candidates.len() - k) as u64) as usize;
            candidates.swap(k, j);
            let at = row + candidates[k];
            labels[at] = i64::from(input_ids[at]);
            match rng.below(10) {
                0..=7 => input_ids[at] = mask,
                8 => {
                    input_ids[at] = loop {
                        let id = rng.below(vocab_size as u64) as u32;
                        if !special.contains(id) {
                            break id;
                        }
                    }
                }
                _ => {}
            }
        }
        masked += n;
    }
    Ok(MlmBatch {
        input_ids,
        labels,
        batch: windows.len(),
        seq_len,
        masked,
    })
}

fn check_vocab(
    tokens: &TokenFile,
    start: usize,
    ids: &[u32],
    vocab_size: usize,
) -> Result<(), DatasetError> {
    match ids.iter().position(|&id| id as usize >= vocab_size) {
        None => Ok(()),
        Some(i) => Err(DatasetError::TokenOutOfRange {
            path: tokens.path().to_path_buf(),
            vocab_size,
            token: ids[i],
            position: (start + i) as u64,
        }),
    }
}
