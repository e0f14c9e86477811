//! Integrity of what a run writes: xxh3-64 checksums of every tensor and of
//! every file of a sharded checkpoint (recorded in `index.json`), and of
//! every tensor of an exported `model.safetensors` (recorded in its own
//! metadata), verified before anything is loaded; and the check that
//! loaded values are finite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::TrainError;

/// The checksum algorithm, as recorded next to the checksums.
pub const CHECKSUM_ALGORITHM: &str = "xxh3-64";
/// Metadata key of an exported `model.safetensors` naming the algorithm.
const META_ALGORITHM: &str = "mics.checksum";
/// Metadata key prefix of an exported tensor's checksum.
const META_TENSOR: &str = "mics.checksum.";

/// The checksum of `bytes`, as 16 hex digits.
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

fn hex(sum: u64) -> String {
    format!("{sum:016x}")
}

/// What `index.json` records of one file of a checkpoint: its length, its
/// checksum and (for a rank file) the checksum of each tensor's data.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileChecksums {
    /// Length in bytes.
    pub bytes: u64,
    /// xxh3-64 of the whole file, 16 hex digits.
    pub xxh3: String,
    /// xxh3-64 of each tensor's data (rank files), by tensor name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tensors: BTreeMap<String, String>,
}

impl FileChecksums {
    /// The checksums of a file's bytes, without tensors.
    pub(crate) fn of_file(bytes: &[u8]) -> FileChecksums {
        FileChecksums {
            bytes: bytes.len() as u64,
            xxh3: hex(checksum(bytes)),
            tensors: BTreeMap::new(),
        }
    }

    /// The checksums of a safetensors file's bytes and of each of its tensors.
    pub(crate) fn of_safetensors(bytes: &[u8]) -> Result<FileChecksums, String> {
        let mut sums = FileChecksums::of_file(bytes);
        for (name, range) in tensor_ranges(bytes)? {
            sums.tensors
                .insert(name, hex(checksum(&bytes[range.start..range.end])));
        }
        Ok(sums)
    }

    /// Packs the sums as f32 values (four 16-bit pieces per sum, each exact
    /// in f32), so that ranks can all-gather them; `names` fixes the order
    /// and the length (a tensor absent from the file packs as zeros with a
    /// zero presence flag).
    pub(crate) fn pack(&self, names: &[String]) -> Vec<f32> {
        let mut out = Vec::with_capacity(8 + 5 * names.len());
        push_u64(&mut out, self.bytes);
        push_u64(&mut out, u64::from_str_radix(&self.xxh3, 16).unwrap_or(0));
        for name in names {
            match self.tensors.get(name) {
                Some(sum) => {
                    out.push(1.0);
                    push_u64(&mut out, u64::from_str_radix(sum, 16).unwrap_or(0));
                }
                None => {
                    out.push(0.0);
                    push_u64(&mut out, 0);
                }
            }
        }
        out
    }

    /// The inverse of [`pack`](Self::pack).
    pub(crate) fn unpack(values: &[f32], names: &[String]) -> FileChecksums {
        let mut it = values.chunks(1);
        let mut next_u64 = || {
            (0..4).fold(0u64, |acc, i| {
                let piece = it.next().map(|v| v[0]).unwrap_or(0.0) as u64;
                acc | (piece << (16 * i))
            })
        };
        let bytes = next_u64();
        let xxh3 = hex(next_u64());
        let mut tensors = BTreeMap::new();
        let mut rest = &values[8.min(values.len())..];
        for name in names {
            if rest.len() < 5 {
                break;
            }
            if rest[0] == 1.0 {
                let sum = (0..4).fold(0u64, |acc, i| acc | ((rest[1 + i] as u64) << (16 * i)));
                tensors.insert(name.clone(), hex(sum));
            }
            rest = &rest[5..];
        }
        FileChecksums {
            bytes,
            xxh3,
            tensors,
        }
    }
}

fn push_u64(out: &mut Vec<f32>, value: u64) {
    for i in 0..4 {
        out.push(((value >> (16 * i)) & 0xffff) as f32);
    }
}

/// The header of a safetensors file: its length and the parsed JSON.
fn header(bytes: &[u8]) -> Result<(usize, serde_json::Map<String, serde_json::Value>), String> {
    let n = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or("shorter than a safetensors header")?;
    let end = 8usize
        .checked_add(usize::try_from(n).map_err(|_| "header length overflows")?)
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| format!("its header claims {n} bytes, more than the file holds"))?;
    let map = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| format!("its header is not valid JSON: {e}"))?;
    Ok((end, map))
}

/// Every tensor of a safetensors file and the byte range of its data in
/// the file, in the order of their offsets.
pub(crate) fn tensor_ranges(bytes: &[u8]) -> Result<Vec<(String, std::ops::Range<usize>)>, String> {
    let (start, map) = header(bytes)?;
    let mut ranges = Vec::new();
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .filter(|o| o.len() == 2)
            .and_then(|o| Some((o[0].as_u64()? as usize, o[1].as_u64()? as usize)))
            .ok_or_else(|| format!("tensor `{name}` has no data offsets"))?;
        let range = start + offsets.0..start + offsets.1;
        if range.start > range.end || range.end > bytes.len() {
            return Err(format!(
                "tensor `{name}` lies past the end of the file (truncated?)"
            ));
        }
        ranges.push((name, range));
    }
    ranges.sort_by_key(|(_, r)| r.start);
    Ok(ranges)
}

/// Checks `bytes`, read from `path`, against the checksums `expected`:
/// a mismatch is one error naming the file and the first tensor whose data
/// differs (or the header, when no tensor does).
pub(crate) fn verify_file(
    path: &Path,
    bytes: &[u8],
    expected: &FileChecksums,
) -> Result<(), TrainError> {
    if bytes.len() as u64 == expected.bytes && hex(checksum(bytes)) == expected.xxh3 {
        return Ok(());
    }
    let corrupt = |tensor: Option<String>, problem: String| TrainError::Corrupt {
        path: path.to_path_buf(),
        tensor,
        problem,
    };
    if !expected.tensors.is_empty() {
        let ranges = tensor_ranges(bytes).map_err(|problem| {
            corrupt(
                None,
                format!(
                    "{problem} ({} bytes, {} when written)",
                    bytes.len(),
                    expected.bytes
                ),
            )
        })?;
        let found: BTreeMap<String, std::ops::Range<usize>> = ranges.into_iter().collect();
        for (name, sum) in &expected.tensors {
            let Some(range) = found.get(name) else {
                return Err(corrupt(
                    Some(name.clone()),
                    "is missing from the file".into(),
                ));
            };
            let actual = hex(checksum(&bytes[range.clone()]));
            if &actual != sum {
                return Err(corrupt(
                    Some(name.clone()),
                    format!(
                        "its data does not match its checksum ({CHECKSUM_ALGORITHM} {actual}, \
                         {sum} when written): the file is corrupt"
                    ),
                ));
            }
        }
    }
    if bytes.len() as u64 != expected.bytes {
        return Err(corrupt(
            None,
            format!(
                "{} bytes, {} when written: the file is truncated or was overwritten",
                bytes.len(),
                expected.bytes
            ),
        ));
    }
    Err(corrupt(
        None,
        format!(
            "the file does not match its checksum ({CHECKSUM_ALGORITHM} {}, {} when written) \
             although every tensor does: its header is corrupt",
            hex(checksum(bytes)),
            expected.xxh3
        ),
    ))
}

/// The first non-finite value of `values`, as (index, value).
pub(crate) fn first_non_finite(values: &[f32]) -> Option<(usize, f32)> {
    values
        .iter()
        .position(|v| !v.is_finite())
        .map(|i| (i, values[i]))
}

/// Rewrites the safetensors file at `path` with the checksum of every
/// tensor in its metadata (`mics.checksum.<tensor>`, and
/// `mics.checksum = "xxh3-64"`). The tensors' data does not move.
pub(crate) fn add_checksums(path: &Path) -> Result<(), TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (start, mut map) = header(&bytes).map_err(|e| TrainError::io(path, e))?;
    let ranges = tensor_ranges(&bytes).map_err(|e| TrainError::io(path, e))?;
    let mut meta: BTreeMap<String, String> = map
        .remove("__metadata__")
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    meta.retain(|k, _| k != META_ALGORITHM && !k.starts_with(META_TENSOR));
    meta.insert(META_ALGORITHM.into(), CHECKSUM_ALGORITHM.into());
    for (name, range) in ranges {
        meta.insert(format!("{META_TENSOR}{name}"), hex(checksum(&bytes[range])));
    }
    let mut header: BTreeMap<String, serde_json::Value> = map.into_iter().collect();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(meta).expect("strings"),
    );
    let mut text = serde_json::to_vec(&header).expect("plain JSON");
    // The data section stays 8-byte aligned, as safetensors writes it.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - start);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[start..]);
    mics_hub::checkpoint::write_atomic(path, &out).map_err(TrainError::hub_io)
}

/// What [`verify_model`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelCheck {
    /// Every tensor matched its recorded checksum.
    Verified {
        /// The file checked.
        file: PathBuf,
        /// Tensors checked.
        tensors: usize,
    },
    /// The file records no checksums (not exported by `mics export`): nothing to verify.
    NoChecksums {
        /// The file.
        file: PathBuf,
    },
    /// The directory has no `model.safetensors`.
    NoFile,
}

/// Verifies the checksums that `mics export` recorded in
/// `dir/model.safetensors` (or the file `dir` itself): every tensor's data
/// must match. A mismatch is a [`TrainError::Corrupt`] naming the file and
/// the tensor. Files without checksums (Hugging Face's own) pass as
/// [`ModelCheck::NoChecksums`].
pub fn verify_model(dir: &Path) -> Result<ModelCheck, TrainError> {
    let file = if dir.is_file() {
        dir.to_path_buf()
    } else {
        dir.join("model.safetensors")
    };
    if !file.is_file() {
        return Ok(ModelCheck::NoFile);
    }
    let bytes = std::fs::read(&file).map_err(|e| TrainError::io(&file, e))?;
    let corrupt = |tensor: Option<String>, problem: String| TrainError::Corrupt {
        path: file.clone(),
        tensor,
        problem,
    };
    let (_, mut map) = header(&bytes).map_err(|p| corrupt(None, p))?;
    let meta: BTreeMap<String, String> = map
        .remove("__metadata__")
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    let Some(algorithm) = meta.get(META_ALGORITHM) else {
        return Ok(ModelCheck::NoChecksums { file });
    };
    if algorithm != CHECKSUM_ALGORITHM {
        return Err(corrupt(
            None,
            format!(
                "checksums of an unknown algorithm `{algorithm}` (expected {CHECKSUM_ALGORITHM})"
            ),
        ));
    }
    let ranges = tensor_ranges(&bytes).map_err(|p| corrupt(None, p))?;
    for (name, range) in &ranges {
        let Some(expected) = meta.get(&format!("{META_TENSOR}{name}")) else {
            return Err(corrupt(
                Some(name.clone()),
                "has no recorded checksum (added after the export?)".into(),
            ));
        };
        let actual = hex(checksum(&bytes[range.clone()]));
        if &actual != expected {
            return Err(corrupt(
                Some(name.clone()),
                format!(
                    "its data does not match the checksum recorded at export ({CHECKSUM_ALGORITHM} \
                     {actual}, {expected} when written): the file is corrupt (--no-verify skips \
                     this check)"
                ),
            ));
        }
    }
    let names: std::collections::BTreeSet<&str> = ranges.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(missing) = meta
        .keys()
        .filter_map(|k| k.strip_prefix(META_TENSOR))
        .find(|name| !names.contains(name))
    {
        return Err(corrupt(
            Some(missing.to_string()),
            "is recorded at export but missing from the file".into(),
        ));
    }
    Ok(ModelCheck::Verified {
        file,
        tensors: ranges.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_checksums_survive_f32() {
        let mut sums = FileChecksums::of_file(b"hello");
        sums.tensors.insert("a".into(), hex(u64::MAX));
        sums.tensors.insert("c".into(), hex(0x0123_4567_89ab_cdef));
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let packed = sums.pack(&names);
        assert_eq!(packed.len(), 8 + 5 * 3);
        assert_eq!(FileChecksums::unpack(&packed, &names), sums);
    }
}
