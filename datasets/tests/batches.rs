//! Causal-LM and masked-LM batches.

mod common;

use common::{TempDir, write_dataset};
use mics_datasets::*;

const VOCAB: usize = 1000;
const SPECIAL: SpecialTokens = SpecialTokens {
    eot: None,
    cls: Some(101),
    sep: Some(102),
    mask: Some(103),
    pad: Some(0),
};

/// A train split of `len` tokens, ids derived from the position, non-special.
fn dataset(len: usize) -> (TempDir, TokenFile) {
    let tmp = TempDir::new("batches");
    let ids: Vec<u32> = (0..len)
        .map(|i| {
            let id = (i * 7919 % (VOCAB - 200)) as u32 + 200;
            if i % 97 == 96 { 102 } else { id } // a separator now and then
        })
        .collect();
    write_dataset(tmp.path(), &ids, &[], VOCAB, SPECIAL);
    let file = TokenFile::open(tmp.path(), Split::Train).unwrap();
    (tmp, file)
}

#[test]
fn lm_targets_are_the_inputs_shifted_by_one() {
    let (_tmp, tokens) = dataset(10_000);
    let seq_len = 16;
    let batch = lm_batch(&tokens, &[3, 0, 7], seq_len);
    assert_eq!((batch.batch, batch.seq_len), (3, seq_len));
    assert_eq!(batch.inputs.len(), 3 * seq_len);
    for (row, w) in [3usize, 0, 7].into_iter().enumerate() {
        let window = tokens.get(w * 17..(w + 1) * 17);
        assert_eq!(batch.inputs[row * 16..(row + 1) * 16], window[..16]);
        assert_eq!(batch.targets[row * 16..(row + 1) * 16], window[1..]);
    }
}

#[test]
fn mlm_masks_15_percent_split_80_10_10() {
    let (_tmp, tokens) = dataset(400_000);
    let seq_len = 128;
    let windows: Vec<usize> = (0..3000).collect();
    let batch = mlm_batch(&tokens, &windows, seq_len, &SPECIAL, VOCAB, 11).unwrap();
    assert_eq!(batch.input_ids.len(), windows.len() * seq_len);
    assert_eq!(batch.labels.len(), windows.len() * seq_len);
    let (mut candidates, mut selected, mut to_mask, mut random, mut kept) = (0, 0, 0, 0, 0);
    for (row, &w) in windows.iter().enumerate() {
        let original = tokens.get(w * 126..(w + 1) * 126);
        let ids = &batch.input_ids[row * seq_len..(row + 1) * seq_len];
        let labels = &batch.labels[row * seq_len..(row + 1) * seq_len];
        assert_eq!((ids[0], ids[seq_len - 1]), (101, 102));
        assert_eq!(
            (labels[0], labels[seq_len - 1]),
            (IGNORE_INDEX, IGNORE_INDEX)
        );
        let row_candidates = original.iter().filter(|&&id| id != 102).count();
        let mut row_selected = 0;
        for i in 0..126 {
            let (id, label, orig) = (ids[i + 1], labels[i + 1], original[i]);
            if label == IGNORE_INDEX {
                assert_eq!(id, orig);
                continue;
            }
            assert_ne!(orig, 102, "a special token was selected");
            assert_eq!(label, i64::from(orig));
            row_selected += 1;
            if id == 103 {
                to_mask += 1;
            } else if id == orig {
                kept += 1;
            } else {
                assert!(!SPECIAL.contains(id) && (id as usize) < VOCAB, "{id}");
                random += 1;
            }
        }
        assert!(row_selected >= 1);
        candidates += row_candidates;
        selected += row_selected;
    }
    assert_eq!(selected, batch.masked);
    let share = |n: usize, of: usize| n as f64 / of as f64;
    let rate = share(selected, candidates);
    assert!((0.135..=0.165).contains(&rate), "selected {rate}");
    let (m, r, k) = (
        share(to_mask, selected),
        share(random, selected),
        share(kept, selected),
    );
    assert!((0.77..=0.83).contains(&m), "[MASK] {m}");
    assert!((0.07..=0.13).contains(&r), "random {r}");
    assert!((0.07..=0.13).contains(&k), "kept {k}");
}

#[test]
fn mlm_masking_depends_only_on_the_seed_and_the_window() {
    let (_tmp, tokens) = dataset(50_000);
    let seq_len = 64;
    let a = mlm_batch(&tokens, &[5, 9, 30], seq_len, &SPECIAL, VOCAB, 3).unwrap();
    // The same windows in another order, in another batch: the same rows.
    let b = mlm_batch(&tokens, &[30, 1, 5, 9], seq_len, &SPECIAL, VOCAB, 3).unwrap();
    let row = |batch: &MlmBatch, r: usize| {
        (
            batch.input_ids[r * seq_len..(r + 1) * seq_len].to_vec(),
            batch.labels[r * seq_len..(r + 1) * seq_len].to_vec(),
        )
    };
    assert_eq!(row(&a, 0), row(&b, 2));
    assert_eq!(row(&a, 1), row(&b, 3));
    assert_eq!(row(&a, 2), row(&b, 0));
    assert_eq!(
        a,
        mlm_batch(&tokens, &[5, 9, 30], seq_len, &SPECIAL, VOCAB, 3).unwrap()
    );
    let c = mlm_batch(&tokens, &[5, 9, 30], seq_len, &SPECIAL, VOCAB, 4).unwrap();
    assert_ne!(a.labels, c.labels);
}

#[test]
fn a_short_sequence_still_masks_one_token() {
    let (_tmp, tokens) = dataset(1000);
    let batch = mlm_batch(&tokens, &[0, 1, 2], 3, &SPECIAL, VOCAB, 0).unwrap();
    assert_eq!(batch.masked, 3);
    assert_eq!(
        batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
        3
    );
}
