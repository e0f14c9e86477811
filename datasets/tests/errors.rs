//! Every error names the file, key or value at fault.

mod common;

use common::{TempDir, word_level_tokenizer, write_dataset};
use mics_datasets::*;

fn message(err: DatasetError) -> String {
    err.to_string()
}

#[test]
fn a_missing_corpus_path_is_named() {
    let tmp = TempDir::new("missing");
    let path = tmp.path().join("x/y");
    let options = PrepareOptions::new(Corpus::Path(path.clone()), TokenizerSpec::Gpt2, tmp.path());
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        format!("corpus path {} does not exist", path.display())
    );
}

#[test]
fn an_empty_corpus_is_an_error() {
    let tmp = TempDir::new("empty");
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let out = tmp.path().join("out");
    let options = PrepareOptions::new(Corpus::Path(corpus.clone()), TokenizerSpec::Gpt2, &out);
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        format!("corpus {} is empty: no .txt files", corpus.display())
    );
    std::fs::write(corpus.join("a.txt"), "").unwrap();
    std::fs::write(corpus.join("b.txt"), "").unwrap();
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        format!(
            "corpus {} is empty: no tokens in its 2 file(s)",
            corpus.display()
        )
    );
    // Nothing written on failure.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

#[test]
fn bad_options_and_tokenizers_are_named() {
    let tmp = TempDir::new("options");
    let corpus = tmp.path().join("a.txt");
    std::fs::write(&corpus, "w1 w2").unwrap();
    let mut options = PrepareOptions::new(
        Corpus::Path(corpus.clone()),
        TokenizerSpec::Gpt2,
        tmp.path(),
    );
    options.val_fraction = 1.0;
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        "validation fraction 1 is not in [0, 1)"
    );
    options.val_fraction = 0.05;
    options.tokenizer = TokenizerSpec::Path(tmp.path().join("nope.json"));
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        format!(
            "tokenizer path {} does not exist",
            tmp.path().join("nope.json").display()
        )
    );
    // A tokenizer without <|endoftext|> or [SEP].
    let tokenizer = tmp.path().join("tokenizer.json");
    word_level_tokenizer(&tokenizer, 10);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    vocab.remove("<|endoftext|>");
    std::fs::write(&tokenizer, json.to_string()).unwrap();
    options.tokenizer = TokenizerSpec::Path(tokenizer.clone());
    assert_eq!(
        message(prepare(&options).unwrap_err()),
        format!(
            "tokenizer {} has neither <|endoftext|> nor [SEP] to separate documents",
            tokenizer.display()
        )
    );
}

#[test]
fn a_missing_meta_json_says_to_run_prepare() {
    let tmp = TempDir::new("nometa");
    let err = TokenFile::open(tmp.path(), Split::Train).unwrap_err();
    assert_eq!(
        message(err),
        format!(
            "dataset {}: meta.json missing (run `mics data prepare`)",
            tmp.path().display()
        )
    );
    let absent = tmp.path().join("absent");
    assert!(message(open_meta(&absent).unwrap_err()).contains("does not exist"));
    std::fs::write(tmp.path().join("meta.json"), "{\"format_version\": 1}").unwrap();
    let err = message(open_meta(tmp.path()).unwrap_err());
    assert!(
        err.contains("meta.json: invalid dataset metadata: missing field"),
        "{err}"
    );
    std::fs::write(tmp.path().join("meta.json"), "{\"format_version\": 9}").unwrap();
    let err = message(open_meta(tmp.path()).unwrap_err());
    assert!(
        err.contains("dataset format version 9, this build reads version 1"),
        "{err}"
    );
}

#[test]
fn a_corrupt_token_file_is_named_with_its_length() {
    let tmp = TempDir::new("corrupt");
    write_dataset(
        tmp.path(),
        &[1; 500],
        &[2; 10],
        50257,
        SpecialTokens::default(),
    );
    let train = tmp.path().join("train.bin");
    let mut bytes = std::fs::read(&train).unwrap();
    bytes.push(0);
    std::fs::write(&train, &bytes).unwrap();
    assert_eq!(
        message(TokenFile::open(tmp.path(), Split::Train).unwrap_err()),
        format!("{} has 1001 bytes, not a multiple of 2", train.display())
    );
    bytes.pop();
    bytes.pop();
    bytes.pop();
    std::fs::write(&train, &bytes).unwrap();
    assert_eq!(
        message(TokenFile::open(tmp.path(), Split::Train).unwrap_err()),
        format!(
            "{} holds 499 tokens but meta.json says 500 (re-run `mics data prepare`)",
            train.display()
        )
    );
}

#[test]
fn an_id_outside_the_vocabulary_is_named() {
    let tmp = TempDir::new("vocab");
    let mut ids = vec![5u32; 100];
    ids[42] = 60000;
    write_dataset(tmp.path(), &ids, &[], 50257, SpecialTokens::default());
    let train = TokenFile::open(tmp.path(), Split::Train).unwrap();
    assert_eq!(
        message(train.validate().unwrap_err()),
        format!(
            "vocabulary 50257 ids but token 60000 in {} at position 42",
            tmp.path().join("train.bin").display()
        )
    );
    let special = SpecialTokens {
        cls: Some(1),
        sep: Some(2),
        mask: Some(3),
        ..SpecialTokens::default()
    };
    let err = mlm_batch(&train, &[0, 1], 50, &special, 50257, 0).unwrap_err();
    assert!(message(err).contains("token 60000"));
}

#[test]
fn sampler_and_batch_arguments_are_checked() {
    assert_eq!(
        message(GlobalBatchSampler::new(100, 129, 8, 0).unwrap_err()),
        "100 tokens make no window of 129 tokens (corpus too small, or window too large)"
    );
    let sampler = GlobalBatchSampler::new(10_000, 10, 12, 0).unwrap();
    assert_eq!(
        message(sampler.micro_batch(0, 0, 5, 1, 0).unwrap_err()),
        "global batch 12 is not world size 5 x accumulation steps 1 x a whole micro-batch"
    );
    assert_eq!(
        message(sampler.micro_batch(0, 4, 4, 1, 0).unwrap_err()),
        "rank 4 is not below the world size 4"
    );
    assert_eq!(
        message(sampler.micro_batch(0, 0, 2, 3, 3).unwrap_err()),
        "micro-step 3 is not below the accumulation steps 3"
    );
    let tmp = TempDir::new("mlm-special");
    write_dataset(tmp.path(), &[5; 100], &[], 1000, SpecialTokens::default());
    let train = TokenFile::open(tmp.path(), Split::Train).unwrap();
    let special = SpecialTokens {
        cls: Some(1),
        sep: Some(2),
        ..SpecialTokens::default()
    };
    assert_eq!(
        message(mlm_batch(&train, &[0], 10, &special, 1000, 0).unwrap_err()),
        "masked LM needs the [MASK] token but the dataset's tokenizer has none (meta.json special.mask is null)"
    );
}
