//! The optimizer state of one parameter shard as plain f32 vectors, decoded
//! from and encoded to the Burn record bytes that `mics-backend` saves
//! (`BinBytesRecorder` at full precision), so that a checkpoint's moments
//! can be checked for non-finite values and re-sharded for another
//! partition size.
//!
//! burn-optim 0.21 lays the states out as:
//! - AdamW: `AdamWState { momentum: AdaptiveMomentumState { time, moment_1,
//!   moment_2, max_moment_2: Option } }`, each moment shaped like the shard;
//! - SGD: `SgdState { momentum: Option<MomentumState { velocity }> }`.
//!
//! `MomentumState`'s field is private: [`SgdMirror`] is a record of the same
//! serialised shape (bincode writes no field names), read and written in
//! its place.

use burn::backend::NdArray;
use burn::optim::{AdamWState, AdaptiveMomentumState};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Record, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::OptimizerKind;

type Cpu = NdArray;

/// One shard's optimizer state, decoded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ShardState {
    /// AdamW's step count and moments.
    AdamW {
        time: usize,
        moment_1: Vec<f32>,
        moment_2: Vec<f32>,
        max_moment_2: Option<Vec<f32>>,
    },
    /// SGD's velocity, when it has momentum.
    Sgd { velocity: Option<Vec<f32>> },
}

/// The same serialised shape as burn-optim's `SgdState<B, 1>`.
#[derive(Record, Clone)]
struct SgdMirror<B: Backend> {
    momentum: Option<VelocityMirror<B>>,
}

/// The same serialised shape as burn-optim's `MomentumState<B, 1>`.
#[derive(Record, Clone)]
struct VelocityMirror<B: Backend> {
    velocity: Tensor<B, 1>,
}

fn recorder() -> BinBytesRecorder<FullPrecisionSettings> {
    BinBytesRecorder::<FullPrecisionSettings>::default()
}

fn values(t: Tensor<Cpu, 1>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32")
}

fn tensor(values: &[f32]) -> Tensor<Cpu, 1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        &Default::default(),
    )
}

impl ShardState {
    /// Decodes the record bytes of optimizer `kind`.
    pub(crate) fn decode(kind: OptimizerKind, bytes: &[u8]) -> Result<ShardState, String> {
        let device = Default::default();
        match kind {
            OptimizerKind::Adamw => {
                let state: AdamWState<Cpu, 1> =
                    Recorder::<Cpu>::load(&recorder(), bytes.to_vec(), &device)
                        .map_err(|e| format!("not an AdamW state: {e}"))?;
                let m = state.momentum;
                Ok(ShardState::AdamW {
                    time: m.time,
                    moment_1: values(m.moment_1),
                    moment_2: values(m.moment_2),
                    max_moment_2: m.max_moment_2.map(values),
                })
            }
            OptimizerKind::Sgd => {
                let state: SgdMirror<Cpu> =
                    Recorder::<Cpu>::load(&recorder(), bytes.to_vec(), &device)
                        .map_err(|e| format!("not an SGD state: {e}"))?;
                Ok(ShardState::Sgd {
                    velocity: state.momentum.map(|m| values(m.velocity)),
                })
            }
        }
    }

    /// Encodes the state as `mics-backend` saves it.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        let bytes = match self {
            ShardState::AdamW {
                time,
                moment_1,
                moment_2,
                max_moment_2,
            } => {
                let mut momentum =
                    AdaptiveMomentumState::new(*time, tensor(moment_1), tensor(moment_2));
                momentum.max_moment_2 = max_moment_2.as_deref().map(tensor);
                Recorder::<Cpu>::record(&recorder(), AdamWState { momentum }, ())
            }
            ShardState::Sgd { velocity } => {
                let state = SgdMirror::<Cpu> {
                    momentum: velocity.as_deref().map(|v| VelocityMirror {
                        velocity: tensor(v),
                    }),
                };
                Recorder::<Cpu>::record(&recorder(), state, ())
            }
        };
        bytes.map_err(|e| format!("cannot encode the optimizer state: {e}"))
    }

    /// The state's vectors with their names (`moment_1`, ...).
    pub(crate) fn vectors(&self) -> Vec<(&'static str, &[f32])> {
        match self {
            ShardState::AdamW {
                moment_1,
                moment_2,
                max_moment_2,
                ..
            } => {
                let mut v = vec![
                    ("moment_1", moment_1.as_slice()),
                    ("moment_2", moment_2.as_slice()),
                ];
                if let Some(m) = max_moment_2 {
                    v.push(("max_moment_2", m.as_slice()));
                }
                v
            }
            ShardState::Sgd { velocity } => velocity
                .iter()
                .map(|v| ("velocity", v.as_slice()))
                .collect(),
        }
    }

    /// The same state with every vector replaced by `f(name, vector)`.
    pub(crate) fn map(&self, mut f: impl FnMut(&[f32]) -> Vec<f32>) -> ShardState {
        match self {
            ShardState::AdamW {
                time,
                moment_1,
                moment_2,
                max_moment_2,
            } => ShardState::AdamW {
                time: *time,
                moment_1: f(moment_1),
                moment_2: f(moment_2),
                max_moment_2: max_moment_2.as_deref().map(&mut f),
            },
            ShardState::Sgd { velocity } => ShardState::Sgd {
                velocity: velocity.as_deref().map(f),
            },
        }
    }

    /// Concatenates the vectors of `parts` (consecutive shards of one
    /// parameter, each of the same kind and step count).
    pub(crate) fn concat(parts: &[ShardState]) -> Result<ShardState, String> {
        let first = parts.first().ok_or("no shards")?;
        let join =
            |pick: &dyn Fn(&ShardState) -> Option<Vec<f32>>| -> Result<Option<Vec<f32>>, String> {
                let picked: Vec<Option<Vec<f32>>> = parts.iter().map(pick).collect();
                if picked.iter().all(Option::is_none) {
                    return Ok(None);
                }
                if picked.iter().any(Option::is_none) {
                    return Err("the shards' optimizer states differ in kind".into());
                }
                Ok(Some(picked.into_iter().flatten().flatten().collect()))
            };
        match first {
            ShardState::AdamW { time, .. } => {
                for p in parts {
                    match p {
                        ShardState::AdamW { time: t, .. } if t == time => {}
                        ShardState::AdamW { time: t, .. } => {
                            return Err(format!(
                                "the shards' AdamW step counts differ ({time} and {t})"
                            ));
                        }
                        ShardState::Sgd { .. } => {
                            return Err("the shards' optimizer states differ in kind".into());
                        }
                    }
                }
                let get = |i: usize| {
                    move |s: &ShardState| match s {
                        ShardState::AdamW {
                            moment_1,
                            moment_2,
                            max_moment_2,
                            ..
                        } => [
                            Some(moment_1.clone()),
                            Some(moment_2.clone()),
                            max_moment_2.clone(),
                        ][i]
                            .clone(),
                        ShardState::Sgd { .. } => None,
                    }
                };
                Ok(ShardState::AdamW {
                    time: *time,
                    moment_1: join(&get(0))?.unwrap_or_default(),
                    moment_2: join(&get(1))?.unwrap_or_default(),
                    max_moment_2: join(&get(2))?,
                })
            }
            ShardState::Sgd { .. } => Ok(ShardState::Sgd {
                velocity: join(&|s: &ShardState| match s {
                    ShardState::Sgd { velocity } => velocity.clone(),
                    ShardState::AdamW { .. } => None,
                })?,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::optim::SgdState;
    use burn::optim::momentum::MomentumState;

    #[test]
    fn adamw_states_round_trip_through_burns_own_records() {
        let mut momentum =
            AdaptiveMomentumState::new(7, tensor(&[1.0, -2.5, 3.0]), tensor(&[0.5, 0.25, 4.0]));
        momentum.max_moment_2 = None;
        let bytes = Recorder::<Cpu>::record(&recorder(), AdamWState { momentum }, ()).unwrap();
        let decoded = ShardState::decode(OptimizerKind::Adamw, &bytes).unwrap();
        assert_eq!(
            decoded,
            ShardState::AdamW {
                time: 7,
                moment_1: vec![1.0, -2.5, 3.0],
                moment_2: vec![0.5, 0.25, 4.0],
                max_moment_2: None,
            }
        );
        assert_eq!(decoded.encode().unwrap(), bytes);
    }

    #[test]
    fn sgd_states_round_trip_through_burns_own_records() {
        let state = SgdState::<Cpu, 1>::new(Some(MomentumState::new(tensor(&[0.5, -1.0]))));
        let bytes = Recorder::<Cpu>::record(&recorder(), state, ()).unwrap();
        let decoded = ShardState::decode(OptimizerKind::Sgd, &bytes).unwrap();
        assert_eq!(
            decoded,
            ShardState::Sgd {
                velocity: Some(vec![0.5, -1.0])
            }
        );
        assert_eq!(decoded.encode().unwrap(), bytes);
        // Burn reads the mirror's bytes back as its own state.
        let back: SgdState<Cpu, 1> =
            Recorder::<Cpu>::load(&recorder(), decoded.encode().unwrap(), &Default::default())
                .unwrap();
        assert!(back.momentum.is_some());
        let none = SgdState::<Cpu, 1>::new(None);
        let bytes = Recorder::<Cpu>::record(&recorder(), none, ()).unwrap();
        assert_eq!(
            ShardState::decode(OptimizerKind::Sgd, &bytes).unwrap(),
            ShardState::Sgd { velocity: None }
        );
    }

    #[test]
    fn concatenated_shards_keep_their_order() {
        let a = ShardState::AdamW {
            time: 3,
            moment_1: vec![1.0],
            moment_2: vec![2.0],
            max_moment_2: None,
        };
        let b = a.map(|v| v.iter().map(|x| x * 10.0).collect());
        let joined = ShardState::concat(&[a, b]).unwrap();
        assert_eq!(
            joined,
            ShardState::AdamW {
                time: 3,
                moment_1: vec![1.0, 10.0],
                moment_2: vec![2.0, 20.0],
                max_moment_2: None,
            }
        );
    }
}
