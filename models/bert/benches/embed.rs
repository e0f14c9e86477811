//! MiniLM (all-MiniLM-L6-v2) sentence-embedding throughput on the CPU (NdArray):
//! batch 32, sequence 128, mean pooling and L2 normalisation included. Criterion
//! reports it as elements (sentences) per second.

use burn::backend::NdArray;
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mics_bert::BertModel;
use mics_hub::assets::asset_dir;

type B = NdArray<f32>;

const BATCH: usize = 32;
const SEQ: usize = 128;

fn embed(c: &mut Criterion) {
    let dir = asset_dir("minilm").unwrap_or_else(|e| panic!("{e}"));
    let device = Default::default();
    let (model, _) = BertModel::<B>::load(&dir, &device).expect("loading MiniLM");
    // [CLS] w w ... [SEP] with ids spread over the vocabulary, no padding.
    let ids: Vec<i64> = (0..BATCH * SEQ)
        .map(|i| match i % SEQ {
            0 => 101,
            p if p == SEQ - 1 => 102,
            _ => 1000 + (i * 7919 % 28000) as i64,
        })
        .collect();
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [BATCH, SEQ]), &device);
    let mask = Tensor::<B, 2, Int>::ones([BATCH, SEQ], &device);
    let mut group = c.benchmark_group("minilm_embed");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch32_seq128", |b| {
        b.iter(|| {
            let out = model.sentence_embeddings(input.clone(), mask.clone());
            out.into_data()
        })
    });
    group.finish();
}

criterion_group!(benches, embed);
criterion_main!(benches);
