//! Reading Wycheproof AEAD vectors from `../shared/testvectors/wycheproof` (or the directory
//! named by `TLSACCEL_TESTVECTORS`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The vector directory: `$TLSACCEL_TESTVECTORS`, else `shared/testvectors/wycheproof` beside
/// the repository checkout.
pub fn vector_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TLSACCEL_TESTVECTORS") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/testvectors/wycheproof")
}

#[derive(Debug, Deserialize)]
struct File {
    #[serde(rename = "testGroups")]
    groups: Vec<Group>,
}

#[derive(Debug, Deserialize)]
struct Group {
    #[serde(rename = "keySize")]
    key_size: u32,
    #[serde(rename = "ivSize")]
    iv_size: u32,
    #[serde(rename = "tagSize")]
    tag_size: u32,
    tests: Vec<RawVector>,
}

#[derive(Debug, Deserialize)]
struct RawVector {
    #[serde(rename = "tcId")]
    id: u32,
    key: String,
    iv: String,
    aad: String,
    msg: String,
    ct: String,
    tag: String,
    result: String,
}

/// One AEAD test case.
#[derive(Debug, Clone)]
pub struct AeadVector {
    pub id: u32,
    pub key_bits: u32,
    pub iv_bits: u32,
    pub tag_bits: u32,
    pub key: Vec<u8>,
    pub iv: Vec<u8>,
    pub aad: Vec<u8>,
    pub msg: Vec<u8>,
    pub ct: Vec<u8>,
    pub tag: Vec<u8>,
    /// `valid`, `invalid` or `acceptable`.
    pub result: String,
}

/// Loads every case of an AEAD vector file, e.g. `aes_gcm_test.json`.
pub fn load_aead(file: &str) -> Result<Vec<AeadVector>> {
    let parsed: File = parse(file)?;
    let mut out = Vec::new();
    for group in parsed.groups {
        for t in group.tests {
            let hex = |s: &str| hex::decode(s).with_context(|| format!("tcId {}: bad hex", t.id));
            out.push(AeadVector {
                id: t.id,
                key_bits: group.key_size,
                iv_bits: group.iv_size,
                tag_bits: group.tag_size,
                key: hex(&t.key)?,
                iv: hex(&t.iv)?,
                aad: hex(&t.aad)?,
                msg: hex(&t.msg)?,
                ct: hex(&t.ct)?,
                tag: hex(&t.tag)?,
                result: t.result.clone(),
            });
        }
    }
    Ok(out)
}

/// Loads a Wycheproof file as raw JSON (for the public-key schemas, whose shapes differ).
pub fn load_json(file: &str) -> Result<serde_json::Value> {
    parse(file)
}

/// Reads and parses a vector file.
fn parse<T: serde::de::DeserializeOwned>(file: &str) -> Result<T> {
    let path = vector_dir().join(file);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read {} (set TLSACCEL_TESTVECTORS to the wycheproof directory)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))
}

/// A hex string field of a JSON object.
pub fn hex_field(value: &serde_json::Value, name: &str) -> Result<Vec<u8>> {
    let text = value
        .get(name)
        .and_then(|v| v.as_str())
        .with_context(|| format!("missing field {name}"))?;
    hex::decode(text).with_context(|| format!("field {name} is not hex"))
}
