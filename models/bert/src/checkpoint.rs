//! Reading and writing BERT safetensors checkpoints with Hugging Face keys.

use std::path::Path;

use burn::module::Param;
use burn::tensor::backend::Backend;
use mics_hub::modules::{
    LoadReport, WeightLayout, load_embedding, load_layer_norm, load_linear, save_layer_norm,
    save_linear,
};
use mics_hub::{
    Checkpoint, CheckpointWriter, HubError, SaveOptions, WEIGHTS_FILE, config, save_pretrained,
};

use crate::config::BertConfig;
use crate::model::{
    BertAttention, BertEmbeddings, BertForMaskedLM, BertLayer, BertLmHead, BertModel, dropout,
};

const BERT_LINEAR: WeightLayout = WeightLayout::OutIn;

fn detect_prefix(ckpt: &Checkpoint) -> &'static str {
    if ckpt.contains("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    }
}

fn read_config(dir: &Path) -> Result<BertConfig, HubError> {
    let config: BertConfig = config::read_config(dir)?;
    config.validate().map_err(|reason| HubError::Config {
        path: dir.join("config.json"),
        reason,
    })?;
    Ok(config)
}

impl<B: Backend> BertModel<B> {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<(Self, LoadReport), HubError> {
        let dir = dir.as_ref();
        let config = read_config(dir)?;
        let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
        let mut report = LoadReport::new(&ckpt, detect_prefix(&ckpt));
        let model = Self::from_checkpoint(&ckpt, &config, &mut report, device)?;
        Ok((model, report.finish(&ckpt)))
    }

    /// Reads the base model from `ckpt` under `report.prefix`, initialising and
    /// recording in `report` a missing pooler.
    pub fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &BertConfig,
        report: &mut LoadReport,
        device: &B::Device,
    ) -> Result<Self, HubError> {
        let activation = config.validate().map_err(|reason| HubError::Config {
            path: ckpt.path().to_path_buf(),
            reason,
        })?;
        let p = report.prefix.clone();
        let d = config.hidden_size;
        let ff = config.intermediate_size;
        let eps = config.layer_norm_eps;
        let mut model = BertModel::<B>::init_skeleton(config, device);
        model.embeddings = BertEmbeddings {
            word_embeddings: load_embedding(
                ckpt,
                &format!("{p}embeddings.word_embeddings.weight"),
                [config.vocab_size, d],
                device,
            )?,
            position_embeddings: load_embedding(
                ckpt,
                &format!("{p}embeddings.position_embeddings.weight"),
                [config.max_position_embeddings, d],
                device,
            )?,
            token_type_embeddings: load_embedding(
                ckpt,
                &format!("{p}embeddings.token_type_embeddings.weight"),
                [config.type_vocab_size, d],
                device,
            )?,
            layer_norm: load_layer_norm(ckpt, &format!("{p}embeddings.LayerNorm"), d, eps, device)?,
            dropout: dropout(config.hidden_dropout_prob),
        };
        model.layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = format!("{p}encoder.layer.{i}");
                Ok(BertLayer {
                    attention: BertAttention {
                        query: load_linear(
                            ckpt,
                            &format!("{l}.attention.self.query"),
                            [d, d],
                            BERT_LINEAR,
                            device,
                        )?,
                        key: load_linear(
                            ckpt,
                            &format!("{l}.attention.self.key"),
                            [d, d],
                            BERT_LINEAR,
                            device,
                        )?,
                        value: load_linear(
                            ckpt,
                            &format!("{l}.attention.self.value"),
                            [d, d],
                            BERT_LINEAR,
                            device,
                        )?,
                        output: load_linear(
                            ckpt,
                            &format!("{l}.attention.output.dense"),
                            [d, d],
                            BERT_LINEAR,
                            device,
                        )?,
                        output_norm: load_layer_norm(
                            ckpt,
                            &format!("{l}.attention.output.LayerNorm"),
                            d,
                            eps,
                            device,
                        )?,
                        n_heads: config.num_attention_heads,
                        probs_dropout: dropout(config.attention_probs_dropout_prob),
                        output_dropout: dropout(config.hidden_dropout_prob),
                    },
                    intermediate: load_linear(
                        ckpt,
                        &format!("{l}.intermediate.dense"),
                        [d, ff],
                        BERT_LINEAR,
                        device,
                    )?,
                    output: load_linear(
                        ckpt,
                        &format!("{l}.output.dense"),
                        [ff, d],
                        BERT_LINEAR,
                        device,
                    )?,
                    output_norm: load_layer_norm(
                        ckpt,
                        &format!("{l}.output.LayerNorm"),
                        d,
                        eps,
                        device,
                    )?,
                    activation,
                    output_dropout: dropout(config.hidden_dropout_prob),
                })
            })
            .collect::<Result<_, HubError>>()?;
        let pooler = format!("{p}pooler.dense");
        if ckpt.contains(&format!("{pooler}.weight")) || ckpt.contains(&format!("{pooler}.bias")) {
            model.pooler = load_linear(ckpt, &pooler, [d, d], BERT_LINEAR, device)?;
        } else {
            report.initialised.push(format!("{pooler} (pooler)"));
        }
        Ok(model)
    }

    /// Writes `model.safetensors` and `config.json` into `dir` (created if needed).
    pub fn save(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<(), HubError> {
        save_pretrained(
            dir.as_ref(),
            options.dtype,
            |writer| self.write_tensors(writer, &options.prefix),
            &self.config_with_architecture("BertModel"),
        )
    }

    /// Adds every parameter to `writer` under its Hugging Face key.
    pub fn write_tensors(&self, writer: &mut CheckpointWriter, prefix: &str) {
        let p = prefix;
        let e = &self.embeddings;
        writer.add(
            format!("{p}embeddings.word_embeddings.weight"),
            e.word_embeddings.weight.val(),
        );
        writer.add(
            format!("{p}embeddings.position_embeddings.weight"),
            e.position_embeddings.weight.val(),
        );
        writer.add(
            format!("{p}embeddings.token_type_embeddings.weight"),
            e.token_type_embeddings.weight.val(),
        );
        save_layer_norm(writer, &format!("{p}embeddings.LayerNorm"), &e.layer_norm);
        for (i, layer) in self.layers.iter().enumerate() {
            let l = format!("{p}encoder.layer.{i}");
            let a = &layer.attention;
            save_linear(
                writer,
                &format!("{l}.attention.self.query"),
                &a.query,
                BERT_LINEAR,
            );
            save_linear(
                writer,
                &format!("{l}.attention.self.key"),
                &a.key,
                BERT_LINEAR,
            );
            save_linear(
                writer,
                &format!("{l}.attention.self.value"),
                &a.value,
                BERT_LINEAR,
            );
            save_linear(
                writer,
                &format!("{l}.attention.output.dense"),
                &a.output,
                BERT_LINEAR,
            );
            save_layer_norm(
                writer,
                &format!("{l}.attention.output.LayerNorm"),
                &a.output_norm,
            );
            save_linear(
                writer,
                &format!("{l}.intermediate.dense"),
                &layer.intermediate,
                BERT_LINEAR,
            );
            save_linear(
                writer,
                &format!("{l}.output.dense"),
                &layer.output,
                BERT_LINEAR,
            );
            save_layer_norm(writer, &format!("{l}.output.LayerNorm"), &layer.output_norm);
        }
        save_linear(
            writer,
            &format!("{p}pooler.dense"),
            &self.pooler,
            BERT_LINEAR,
        );
    }

    fn config_with_architecture(&self, architecture: &str) -> BertConfig {
        let mut config = self.config.clone();
        config
            .extra
            .insert("architectures".into(), serde_json::json!([architecture]));
        config
    }

    /// A model whose parameters are about to be replaced by a checkpoint's: freshly
    /// initialised (so anything the file lacks is a proper initialisation).
    fn init_skeleton(config: &BertConfig, device: &B::Device) -> Self {
        BertModel::init(config, device)
    }
}

impl<B: Backend> BertForMaskedLM<B> {
    /// Loads `config.json` and `model.safetensors` from `dir`; a missing MLM head
    /// or pooler is initialised and listed in the report.
    pub fn load(dir: impl AsRef<Path>, device: &B::Device) -> Result<(Self, LoadReport), HubError> {
        let dir = dir.as_ref();
        let config = read_config(dir)?;
        let ckpt = Checkpoint::open(dir.join(WEIGHTS_FILE))?;
        let mut report = LoadReport::new(&ckpt, detect_prefix(&ckpt));
        let bert = BertModel::from_checkpoint(&ckpt, &config, &mut report, device)?;
        let head = BertLmHead::from_checkpoint(&ckpt, &config, &bert, &mut report, device)?;
        Ok((BertForMaskedLM { bert, head }, report.finish(&ckpt)))
    }

    /// Writes `model.safetensors` and `config.json` into `dir`: the base model under
    /// `options.prefix` (Hugging Face uses `bert.`) and the head under `cls.`.
    pub fn save(&self, dir: impl AsRef<Path>, options: &SaveOptions) -> Result<(), HubError> {
        let add = |writer: &mut CheckpointWriter| {
            self.bert.write_tensors(writer, &options.prefix);
            save_linear(
                writer,
                "cls.predictions.transform.dense",
                &self.head.dense,
                BERT_LINEAR,
            );
            save_layer_norm(
                writer,
                "cls.predictions.transform.LayerNorm",
                &self.head.layer_norm,
            );
            writer.add("cls.predictions.bias", self.head.bias.val());
        };
        let config = self.bert.config_with_architecture("BertForMaskedLM");
        save_pretrained(dir.as_ref(), options.dtype, add, &config)
    }
}

impl<B: Backend> BertLmHead<B> {
    fn from_checkpoint(
        ckpt: &Checkpoint,
        config: &BertConfig,
        bert: &BertModel<B>,
        report: &mut LoadReport,
        device: &B::Device,
    ) -> Result<Self, HubError> {
        let mut head = BertLmHead::init(config, device);
        let d = config.hidden_size;
        let dense = "cls.predictions.transform.dense";
        if !ckpt.contains(&format!("{dense}.weight")) {
            report
                .initialised
                .push("cls.predictions (masked-LM head)".into());
            return Ok(head);
        }
        head.dense = load_linear(ckpt, dense, [d, d], BERT_LINEAR, device)?;
        head.layer_norm = load_layer_norm(
            ckpt,
            "cls.predictions.transform.LayerNorm",
            d,
            config.layer_norm_eps,
            device,
        )?;
        let bias_key = if ckpt.contains("cls.predictions.bias") {
            "cls.predictions.bias"
        } else {
            "cls.predictions.decoder.bias"
        };
        head.bias = Param::from_tensor(ckpt.tensor(bias_key, [config.vocab_size], device)?);
        let decoder = "cls.predictions.decoder.weight";
        if ckpt.contains(decoder) {
            let stored = ckpt.read_f32(decoder, &[config.vocab_size, d])?;
            let tied: Vec<f32> = bert
                .embeddings
                .word_embeddings
                .weight
                .val()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 data");
            if stored != tied {
                return Err(HubError::Value {
                    path: ckpt.path().to_path_buf(),
                    key: decoder.into(),
                    reason: "differs from the word embeddings; mics ties the decoder to them"
                        .into(),
                });
            }
        }
        Ok(head)
    }
}
