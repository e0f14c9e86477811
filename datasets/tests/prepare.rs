//! `prepare` end to end on small corpora and on the real assets.

mod common;

use std::path::Path;

use common::{TempDir, word_level_tokenizer};
use mics_datasets::*;

const GPT2_EOT: u32 = 50256;

fn gpt2_options(corpus: &Path, out: &Path) -> PrepareOptions {
    PrepareOptions::new(Corpus::Path(corpus.to_path_buf()), TokenizerSpec::Gpt2, out)
}

#[test]
fn gpt2_ids_match_the_tokenizer_and_documents_end_with_endoftext() {
    let tmp = TempDir::new("gpt2");
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(corpus.join("sub")).unwrap();
    std::fs::write(corpus.join("a.txt"), "Hello world, the quick brown fox.").unwrap();
    std::fs::write(corpus.join("sub/b.txt"), "\u{feff}To be, or not to be").unwrap();
    std::fs::write(corpus.join("ignored.md"), "not a text file").unwrap();
    let out = tmp.path().join("data");
    let mut options = gpt2_options(&corpus, &out);
    options.val_fraction = 0.0;
    let meta = prepare(&options).unwrap();

    let hello = [15496, 995, 11, 262, 2068, 7586, 21831, 13];
    let tokenizer = TokenizerSpec::Gpt2.load().unwrap();
    assert_eq!(
        tokenizer
            .encode("Hello world, the quick brown fox.", false)
            .unwrap(),
        hello
    );
    let hamlet = tokenizer.encode("To be, or not to be", false).unwrap();
    let mut expected = hello.to_vec();
    expected.push(GPT2_EOT);
    expected.extend(&hamlet);
    expected.push(GPT2_EOT);

    assert_eq!(meta.documents, 2);
    assert_eq!(meta.vocab_size, 50257);
    assert_eq!(meta.dtype, TokenDType::U16);
    assert_eq!(meta.tokenizer, "gpt2");
    assert_eq!(meta.corpus, corpus.display().to_string());
    assert_eq!(
        meta.special,
        SpecialTokens {
            eot: Some(GPT2_EOT),
            ..SpecialTokens::default()
        }
    );
    assert_eq!(meta.train_tokens, expected.len() as u64);
    assert_eq!(meta.val_tokens, 0);

    // The memory-mapped round trip.
    let train = TokenFile::open(&out, Split::Train).unwrap();
    assert_eq!(train.meta(), &meta);
    assert_eq!(train.len(), expected.len());
    assert_eq!(train.get(0..train.len()), expected);
    assert_eq!(train.get(3..5), expected[3..5]);
    train.validate().unwrap();
    let val = TokenFile::open(&out, Split::Val).unwrap();
    assert!(val.is_empty());
    assert_eq!(val.get(0..0), Vec::<u32>::new());
    assert_eq!(open_meta(&out).unwrap(), meta);

    // The dataset is self-contained: its tokenizer.json encodes the same.
    let copy = mics_hub::TextTokenizer::from_tokenizer_json(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        copy.encode("Hello world, the quick brown fox.", false)
            .unwrap(),
        hello
    );
    assert_eq!(copy.token_to_id("<|endoftext|>"), Some(GPT2_EOT));
    assert_eq!(copy.vocab_size(), 50257);
    // Only the four dataset files: no temporary file left behind.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    );
}

#[test]
fn the_tail_of_every_document_goes_to_val() {
    let tmp = TempDir::new("split");
    let tokenizer = tmp.path().join("tokenizer.json");
    word_level_tokenizer(&tokenizer, 100);
    let corpus = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let doc =
        |range: std::ops::Range<u32>| range.map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    std::fs::write(corpus.join("1.txt"), doc(0..20)).unwrap();
    std::fs::write(corpus.join("2.txt"), doc(20..60)).unwrap();
    std::fs::write(corpus.join("3.txt"), " \n").unwrap(); // no tokens: skipped
    let out = tmp.path().join("data");
    let mut options = PrepareOptions::new(
        Corpus::Path(corpus),
        TokenizerSpec::Path(tokenizer.clone()),
        &out,
    );
    options.val_fraction = 0.1;
    let meta = prepare(&options).unwrap();
    assert_eq!(meta.documents, 2);
    assert_eq!(meta.tokenizer, tokenizer.display().to_string());
    assert_eq!(meta.special.eot, Some(99));
    let eot = 99;
    let train = TokenFile::open(&out, Split::Train).unwrap();
    let val = TokenFile::open(&out, Split::Val).unwrap();
    let mut expected_train: Vec<u32> = (0..18).collect();
    expected_train.push(eot);
    expected_train.extend(20..56);
    expected_train.push(eot);
    assert_eq!(train.get(0..train.len()), expected_train);
    assert_eq!(val.get(0..val.len()), [18, 19, eot, 56, 57, 58, 59, eot]);

    assert_eq!(val_tokens_of_document(1, 0.05), 0);
    assert_eq!(val_tokens_of_document(2, 0.05), 1);
    assert_eq!(val_tokens_of_document(1000, 0.05), 50);
    assert_eq!(val_tokens_of_document(1000, 0.0), 0);
}

#[test]
fn a_vocabulary_above_65536_ids_is_stored_as_u32() {
    let tmp = TempDir::new("u32");
    for (size, dtype) in [(65536, TokenDType::U16), (65537, TokenDType::U32)] {
        let tokenizer = tmp.path().join(format!("tokenizer-{size}.json"));
        word_level_tokenizer(&tokenizer, size);
        let corpus = tmp.path().join("doc.txt");
        let last_word = size - 3;
        std::fs::write(&corpus, format!("w{last_word} w1 w2 nonsense")).unwrap();
        let out = tmp.path().join(format!("data-{size}"));
        let mut options =
            PrepareOptions::new(Corpus::Path(corpus), TokenizerSpec::Path(tokenizer), &out);
        options.val_fraction = 0.0;
        let meta = prepare(&options).unwrap();
        assert_eq!(meta.vocab_size, size);
        assert_eq!(meta.dtype, dtype);
        let bytes = std::fs::metadata(out.join("train.bin")).unwrap().len();
        assert_eq!(bytes, 5 * dtype.bytes() as u64);
        let train = TokenFile::open(&out, Split::Train).unwrap();
        let (unk, eot) = (size as u32 - 2, size as u32 - 1);
        assert_eq!(
            train.get(0..5),
            [last_word as u32, 1, 2, unk, eot],
            "vocabulary of {size}"
        );
    }
}

#[test]
fn an_existing_dataset_survives_a_failed_prepare_and_is_replaced_by_a_good_one() {
    let tmp = TempDir::new("replace");
    let out = tmp.path().join("data");
    let first = tmp.path().join("first.txt");
    std::fs::write(&first, "one two three four").unwrap();
    let meta = prepare(&gpt2_options(&first, &out)).unwrap();

    let err = prepare(&gpt2_options(&tmp.path().join("missing.txt"), &out)).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = prepare(&gpt2_options(&empty, &out)).unwrap_err();
    assert!(err.to_string().contains("no tokens"), "{err}");
    assert_eq!(open_meta(&out).unwrap(), meta);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);

    let second = tmp.path().join("second.txt");
    std::fs::write(&second, "a much longer text than the first one was").unwrap();
    let new = prepare(&gpt2_options(&second, &out)).unwrap();
    assert!(new.train_tokens > meta.train_tokens);
    assert_eq!(open_meta(&out).unwrap(), new);
    assert_eq!(
        TokenFile::open(&out, Split::Train).unwrap().len() as u64,
        new.train_tokens
    );
}

#[test]
fn shakespeare_with_gpt2() {
    let tmp = TempDir::new("shakespeare");
    let started = std::time::Instant::now();
    let options = PrepareOptions::new(Corpus::Shakespeare, TokenizerSpec::Gpt2, tmp.path());
    let meta = prepare(&options).unwrap();
    eprintln!("shakespeare/gpt2 in {:.2?}: {meta:?}", started.elapsed());
    assert_eq!(meta.documents, 42);
    assert_eq!(meta.corpus, "shakespeare");
    assert_eq!(meta.dtype, TokenDType::U16);
    let total = meta.train_tokens + meta.val_tokens;
    // About 5 MB of text at ~4 bytes per token.
    assert!((1_000_000..2_500_000).contains(&total), "{total}");
    let val_share = meta.val_tokens as f64 / total as f64;
    assert!((0.045..0.055).contains(&val_share), "{val_share}");
    let train = TokenFile::open(tmp.path(), Split::Train).unwrap();
    train.validate().unwrap();
    // 42 plays: 42 separators in each split.
    let eots = train
        .get(0..train.len())
        .iter()
        .filter(|&&id| id == GPT2_EOT)
        .count();
    assert_eq!(eots, 42);
    let tokenizer = TokenizerSpec::Gpt2.load().unwrap();
    let text = tokenizer.decode(&train.get(0..20)).unwrap();
    assert!(text.contains("ALL'S WELL"), "{text}");
}

#[test]
fn moby_dick_with_bert() {
    let tmp = TempDir::new("moby");
    let started = std::time::Instant::now();
    let options = PrepareOptions::new(Corpus::MobyDick, TokenizerSpec::Bert, tmp.path());
    let meta = prepare(&options).unwrap();
    eprintln!("moby-dick/bert in {:.2?}: {meta:?}", started.elapsed());
    assert_eq!(meta.documents, 1);
    assert_eq!(meta.vocab_size, 30522);
    assert_eq!(meta.dtype, TokenDType::U16);
    assert_eq!(
        meta.special,
        SpecialTokens {
            eot: None,
            cls: Some(101),
            sep: Some(102),
            mask: Some(103),
            pad: Some(0),
        }
    );
    let total = meta.train_tokens + meta.val_tokens;
    assert!((200_000..600_000).contains(&total), "{total}");
    let val = TokenFile::open(tmp.path(), Split::Val).unwrap();
    let ids = val.get(0..val.len());
    assert_eq!(ids.last(), Some(&102));
    assert_eq!(ids.iter().filter(|&&id| id == 102).count(), 1);
    // The saved tokenizer neither pads nor truncates.
    let copy =
        mics_hub::TextTokenizer::from_tokenizer_json(tmp.path().join("tokenizer.json")).unwrap();
    let long = "whale ".repeat(300);
    assert_eq!(copy.encode(&long, false).unwrap().len(), 300);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("tokenizer.json")).unwrap())
            .unwrap();
    assert!(json["padding"].is_null() && json["truncation"].is_null());
}
