//! all-MiniLM-L6-v2 (the real checkpoint from `scripts/fetch-assets`) against the
//! similarities sentence-transformers publishes and the ids its tokenizer gives.

use burn::backend::NdArray;
use burn::tensor::Tensor;
use mics_bert::{BertModel, pad_batch};
use mics_hub::{TextTokenizer, assets::asset_dir};

type B = NdArray<f32>;

const SENTENCES: [&str; 3] = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
];

/// Accents stripped, emoji unknown, a word split into pieces.
const HARD: &str = "Héllo,   naïve  WORLD 🤗 unbelievable!";

/// Ids from the reference tokenizer: Python `tokenizers` 0.23.3 (PyPI) on the
/// same `tokenizer.json` with `no_padding()` and `no_truncation()`.
const EXPECTED_IDS: [&[u32]; 3] = [
    &[101, 1996, 4633, 2003, 8403, 2651, 1012, 102],
    &[101, 2009, 1005, 1055, 2061, 11559, 2648, 999, 102],
    &[101, 2002, 5225, 2000, 1996, 3346, 1012, 102],
];
const HARD_IDS: &[u32] = &[101, 7592, 1010, 15743, 2088, 100, 23653, 999, 102];

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn minilm_tokenizer_ids_match_reference() {
    let dir = asset_dir("minilm").unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    for (text, expected) in SENTENCES.iter().zip(EXPECTED_IDS) {
        assert_eq!(tokenizer.encode(text, true).unwrap(), expected, "{text}");
    }
    assert_eq!(tokenizer.encode(HARD, true).unwrap(), HARD_IDS);
    // Padding and truncation (128 in the file) are off: a long text keeps every token.
    let long = "word ".repeat(300);
    assert_eq!(tokenizer.encode(&long, true).unwrap().len(), 302);
}

#[test]
fn minilm_similarities_match_sentence_transformers() {
    let dir = asset_dir("minilm").unwrap_or_else(|e| panic!("{e}"));
    let device = Default::default();
    let (model, report) = BertModel::<B>::load(&dir, &device).unwrap();
    assert_eq!(report.prefix, "");
    assert!(report.initialised.is_empty(), "{report}");
    assert_eq!(report.ignored, ["embeddings.position_ids"]);
    let tokenizer = TextTokenizer::from_dir(&dir).unwrap();
    let ids: Vec<Vec<u32>> = SENTENCES
        .iter()
        .map(|s| tokenizer.encode(s, true).unwrap())
        .collect();
    // One padded batch: padding must not change any embedding.
    let (input, mask) = pad_batch::<B>(&ids, 0, &device);
    let batched: Tensor<B, 2> = model.sentence_embeddings(input, mask);
    let rows: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            batched
                .clone()
                .slice([i..i + 1, 0..384])
                .into_data()
                .to_vec()
                .unwrap()
        })
        .collect();
    let sims = [
        dot(&rows[0], &rows[1]),
        dot(&rows[0], &rows[2]),
        dot(&rows[1], &rows[2]),
    ];
    let published = [0.6660, 0.1046, 0.1411];
    for (got, want) in sims.iter().zip(published) {
        assert!(
            (got - want).abs() < 1e-3,
            "similarities {sims:?}, published {published:?}"
        );
    }
    // Each sentence alone (no padding) gives the same embedding as in the batch.
    for (i, seq) in ids.iter().enumerate() {
        let (input, mask) = pad_batch::<B>(std::slice::from_ref(seq), 0, &device);
        let alone: Vec<f32> = model
            .sentence_embeddings(input, mask)
            .into_data()
            .to_vec()
            .unwrap();
        let diff = alone
            .iter()
            .zip(&rows[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff < 1e-5,
            "sentence {i}: padded vs unpadded differ by {diff}"
        );
    }
    eprintln!("similarities {sims:?}");
}
