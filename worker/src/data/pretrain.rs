//! The pretraining dataset: JSONL documents -> tokens (as `tokenizer(text)` gives them,
//! special tokens included; EOS appended per document only with `append_eos`) ->
//! concatenated and cut into `block_size` blocks (run_clm's `group_texts`), cached on disk
//! as a memory-mapped array of u32 token ids and reused across runs.
//!
//! Contract:
//! - Input: JSONL files in the given order, one document per line in `text_field`.
//!   Reading streams line chunks through a rayon pool, so memory does not grow with the
//!   file size. A malformed line fails as `file:line: <serde error>`; with
//!   `skip_bad_lines` it is counted instead and the count is reported (`meta.skipped_lines`).
//! - Blocks: exactly run_clm's `group_texts` under `datasets.map(batched=True)`: the
//!   documents are grouped `group_documents` at a time (1000 in run_clm) and each group's
//!   remainder shorter than `block_size` is dropped; with `shards` > 1 (run_clm's
//!   `preprocessing_num_workers`, which shards the rows contiguously, the first
//!   `n % shards` shards one row longer) each shard is grouped from its own start.
//!   `group_documents: None` groups the whole corpus at once (one remainder dropped).
//!   A document is a line holding text (an empty text included); blank lines are none;
//!   a line skipped by `skip_bad_lines` still counts toward its group (datasets would
//!   have refused the file).
//! - Cache: `<cache_dir>/<key>/tokens.bin` (u32 little-endian, `num_blocks * block_size`)
//!   and `meta.json`, key = sha256 over (format version, each file's content sha256,
//!   tokenizer fingerprint, block_size, text_field, skip_bad_lines, the grouping, EOS). Built in a temporary directory and
//!   renamed into place, so a reader never sees half a cache.
//! - One builder per node: the caller says `is_builder` (local rank 0); the others poll for
//!   `meta.json`, calling a `wait` function between polls, and fail if the builder left a
//!   `<key>.failed` note. One builder per entry across jobs: a builder first takes an
//!   exclusive `flock` on `<key>.lock` (released when it ends, however it ends); another
//!   job's builder of the same entry waits for it (calling `wait`), then uses the cache
//!   that one built instead of building it again.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::manifest::hash_file;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Bumped whenever the cache layout or the blocking rule changes.
const CACHE_FORMAT_VERSION: u32 = 2;
/// Lines tokenized together: bounds the memory the streaming reader holds.
const LINES_PER_CHUNK: usize = 4096;

/// What to build: files, field, block size, cache location.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    pub files: Vec<PathBuf>,
    pub text_field: String,
    pub block_size: usize,
    pub skip_bad_lines: bool,
    pub cache_dir: PathBuf,
    /// Documents per `group_texts` call; `None`: the whole corpus (or shard) at once.
    pub group_documents: Option<usize>,
    /// Contiguous shards grouped separately (run_clm's `preprocessing_num_workers`).
    pub shards: usize,
    pub append_eos: bool,
}

/// An input file and the sha256 of its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    pub path: String,
    pub sha256: String,
}

/// meta.json of a built cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheMeta {
    pub version: u32,
    pub key: String,
    pub files: Vec<InputFile>,
    pub tokenizer: String,
    pub text_field: String,
    pub block_size: usize,
    pub num_documents: u64,
    pub num_tokens: u64,
    pub num_blocks: u64,
    pub dropped_tail_tokens: u64,
    pub skipped_lines: u64,
}

/// A built (or reused) pretraining dataset: `num_blocks` blocks of `block_size` ids.
#[derive(Debug)]
pub struct PretrainDataset {
    mmap: Mmap,
    meta: CacheMeta,
    dir: PathBuf,
    cache_hit: bool,
}

impl PretrainDataset {
    /// Opens the cache for `config`, building it first when missing (`is_builder`) or
    /// waiting for the builder (`wait` is called between polls; an error from it aborts).
    pub fn load_or_build(
        config: &PretrainConfig,
        tokenizer: &Tokenizer,
        is_builder: bool,
        mut wait: impl FnMut() -> Result<()>,
    ) -> Result<Self> {
        validate_config(config)?;
        let files = hash_inputs(&config.files)?;
        let key = cache_key(&files, &tokenizer_fingerprint(tokenizer)?, config);
        let dir = config.cache_dir.join(&key);
        if dir.join("meta.json").is_file() {
            return Self::open(&dir, true);
        }
        if is_builder {
            let _span = tracing::info_span!("build_pretrain_cache", key = %key).entered();
            let _entry = lock_entry(&config.cache_dir, &key, &mut wait)?;
            if dir.join("meta.json").is_file() {
                return Self::open(&dir, true); // another job built it meanwhile
            }
            let failure_note = config.cache_dir.join(format!("{key}.failed"));
            let _ = std::fs::remove_file(&failure_note);
            if let Err(e) = build_cache(config, tokenizer, &files, &key, &dir) {
                let _ = std::fs::write(&failure_note, e.to_string());
                return Err(e);
            }
            return Self::open(&dir, false);
        }
        wait_for_builder(config, &key, &dir, &mut wait)?;
        Self::open(&dir, true)
    }

    /// Opens an existing cache directory.
    pub fn open(dir: &Path, cache_hit: bool) -> Result<Self> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path)
            .map_err(|e| Error::io(format!("reading {}", meta_path.display()), e))?;
        let meta: CacheMeta = serde_json::from_str(&text)
            .map_err(|e| Error::Data(format!("{}: {e}", meta_path.display())))?;
        let tokens_path = dir.join("tokens.bin");
        let file = File::open(&tokens_path)
            .map_err(|e| Error::io(format!("opening {}", tokens_path.display()), e))?;
        // SAFETY: the cache file is written once, renamed into place and never modified.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| Error::io(format!("mapping {}", tokens_path.display()), e))?;
        let expected = meta.num_blocks * meta.block_size as u64 * 4;
        if mmap.len() as u64 != expected {
            return Err(Error::Data(format!(
                "{}: {} bytes, meta.json says {expected}",
                tokens_path.display(),
                mmap.len()
            )));
        }
        Ok(PretrainDataset {
            mmap,
            meta,
            dir: dir.to_path_buf(),
            cache_hit,
        })
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.meta.num_blocks as usize
    }

    pub fn is_empty(&self) -> bool {
        self.meta.num_blocks == 0
    }

    pub fn block_size(&self) -> usize {
        self.meta.block_size
    }

    /// The token ids of block `index`.
    pub fn block(&self, index: usize) -> Result<Vec<u32>> {
        if index >= self.len() {
            return Err(Error::Data(format!(
                "block {index} out of range ({} blocks)",
                self.len()
            )));
        }
        let width = self.meta.block_size * 4;
        let bytes = &self.mmap[index * width..(index + 1) * width];
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    /// The cache directory (`<cache_dir>/<key>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the cache existed already (false when this call built it).
    pub fn cache_hit(&self) -> bool {
        self.cache_hit
    }
}

/// Fails before training when a block would not fit the model's positions.
pub fn check_block_size(block_size: usize, max_position_embeddings: usize) -> Result<()> {
    if block_size == 0 || block_size > max_position_embeddings {
        return Err(Error::Config(format!(
            "block_size {block_size} must be in 1..={max_position_embeddings} (the model's max_position_embeddings)"
        )));
    }
    Ok(())
}

/// A polling `wait` for `load_or_build`: sleeps `interval`, fails after `timeout`.
pub fn poll_wait(interval: Duration, timeout: Duration) -> impl FnMut() -> Result<()> {
    let started = Instant::now();
    move || {
        if started.elapsed() > timeout {
            return Err(Error::Data(format!(
                "timed out after {timeout:?} waiting for the builder rank's data cache"
            )));
        }
        std::thread::sleep(interval);
        Ok(())
    }
}

fn validate_config(config: &PretrainConfig) -> Result<()> {
    if config.files.is_empty() {
        return Err(Error::Data("no pretraining files given".into()));
    }
    if config.block_size == 0 {
        return Err(Error::Config("block_size must be positive".into()));
    }
    if config.text_field.is_empty() {
        return Err(Error::Config("text_field must not be empty".into()));
    }
    Ok(())
}

/// The tokenizer's fingerprint (sha256 of tokenizer.json) and its EOS id.
fn tokenizer_fingerprint(tokenizer: &Tokenizer) -> Result<String> {
    Ok(format!(
        "{}/eos={:?}",
        tokenizer.fingerprint(),
        tokenizer.eos_id()
    ))
}

fn hash_inputs(files: &[PathBuf]) -> Result<Vec<InputFile>> {
    files
        .par_iter()
        .map(|path| {
            Ok(InputFile {
                path: path.to_string_lossy().into_owned(),
                sha256: hash_file(path)?,
            })
        })
        .collect()
}

/// The cache key: inputs by content (not by path), tokenizer, block size, field.
pub fn cache_key(files: &[InputFile], tokenizer: &str, config: &PretrainConfig) -> String {
    let mut hasher = Sha256::new();
    hasher.update(format!("rsdeep-pretrain-v{CACHE_FORMAT_VERSION}\n").as_bytes());
    for file in files {
        hasher.update(format!("file {}\n", file.sha256).as_bytes());
    }
    hasher.update(format!("tokenizer {tokenizer}\n").as_bytes());
    hasher.update(format!("block_size {}\n", config.block_size).as_bytes());
    hasher.update(format!("text_field {}\n", config.text_field).as_bytes());
    // With the setting in the key, a `.failed` note left for this key is a deterministic
    // failure of these very inputs, so waiting ranks may trust it.
    hasher.update(format!("skip_bad_lines {}\n", config.skip_bad_lines).as_bytes());
    hasher.update(format!("group_documents {:?}\n", config.group_documents).as_bytes());
    hasher.update(format!("shards {}\n", config.shards.max(1)).as_bytes());
    hasher.update(format!("append_eos {}\n", config.append_eos).as_bytes());
    hex::encode(hasher.finalize())[..32].to_string()
}

fn wait_for_builder(
    config: &PretrainConfig,
    key: &str,
    dir: &Path,
    wait: &mut impl FnMut() -> Result<()>,
) -> Result<()> {
    let failure_note = config.cache_dir.join(format!("{key}.failed"));
    while !dir.join("meta.json").is_file() {
        if let Ok(reason) = std::fs::read_to_string(&failure_note) {
            return Err(Error::OtherRankFailed(format!(
                "data: the builder rank failed to build the data cache (local rank 0 of this node): {reason}"
            )));
        }
        wait()?;
    }
    Ok(())
}

/// Takes the exclusive lock on building cache entry `key` (`<cache_dir>/<key>.lock`, the
/// holder's pid written in it), waiting (`wait` between tries) while another process
/// holds it; held until the returned lock drops.
fn lock_entry(
    cache_dir: &Path,
    key: &str,
    wait: &mut impl FnMut() -> Result<()>,
) -> Result<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(cache_dir)
        .map_err(|e| Error::io(format!("creating {}", cache_dir.display()), e))?;
    let path = cache_dir.join(format!("{key}.lock"));
    let mut announced = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = write!(lock, "{}", std::process::id());
                return Ok(lock);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                if !announced {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    tracing::info!(
                        lock = %path.display(),
                        holder = %holder.trim(),
                        "another process is building this data cache entry; waiting for it"
                    );
                    announced = true;
                }
                wait()?;
            }
            Err((_, errno)) => {
                return Err(Error::io(
                    format!("locking {}", path.display()),
                    std::io::Error::from(errno),
                ));
            }
        }
    }
}

/// Removes `<key>.tmp-<pid>` folders of builders that died (a killed job); a living
/// builder's (another job building the same entry) stays.
fn remove_dead_builders_leftovers(cache_dir: &Path, key: &str) {
    let Ok(entries) = std::fs::read_dir(cache_dir) else {
        return;
    };
    let prefix = format!("{key}.tmp-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !rsdeep_contract::process::pid_alive(pid) {
            tracing::info!(dir = %entry.path().display(), "removing a dead builder's partial data cache");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Streams every file into `<dir>.tmp-<pid>`, then renames it to `dir`.
fn build_cache(
    config: &PretrainConfig,
    tokenizer: &Tokenizer,
    files: &[InputFile],
    key: &str,
    dir: &Path,
) -> Result<()> {
    let eos = match config.append_eos {
        true => Some(tokenizer.eos_id().ok_or_else(|| {
            Error::Tokenizer(
                "the tokenizer has no eos_token, so append_eos cannot add one per document: \
                 set append_eos to false"
                    .into(),
            )
        })?),
        false => None,
    };
    std::fs::create_dir_all(&config.cache_dir)
        .map_err(|e| Error::io(format!("creating {}", config.cache_dir.display()), e))?;
    remove_dead_builders_leftovers(&config.cache_dir, key);
    let tmp = config
        .cache_dir
        .join(format!("{key}.tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let result = write_blocks(config, tokenizer, eos, &tmp.join("tokens.bin"));
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if stats.skipped_lines > 0 {
        tracing::warn!(
            skipped = stats.skipped_lines,
            "skipped malformed lines (skip_bad_lines)"
        );
    }
    let meta = CacheMeta {
        version: CACHE_FORMAT_VERSION,
        key: key.to_string(),
        files: files.to_vec(),
        tokenizer: tokenizer_fingerprint(tokenizer)?,
        text_field: config.text_field.clone(),
        block_size: config.block_size,
        num_documents: stats.documents,
        num_tokens: stats.tokens,
        num_blocks: stats.blocks,
        dropped_tail_tokens: stats.tokens - stats.blocks * config.block_size as u64,
        skipped_lines: stats.skipped_lines,
    };
    let meta_text = serde_json::to_string_pretty(&meta).map_err(|e| Error::Data(e.to_string()))?;
    std::fs::write(tmp.join("meta.json"), meta_text)
        .map_err(|e| Error::io(format!("writing {}/meta.json", tmp.display()), e))?;
    if std::fs::rename(&tmp, dir).is_err() && dir.join("meta.json").is_file() {
        // Another builder (another node on a shared disk) finished first: same content.
        let _ = std::fs::remove_dir_all(&tmp);
    } else if !dir.join("meta.json").is_file() {
        return Err(Error::Data(format!(
            "could not move the cache into {}",
            dir.display()
        )));
    }
    Ok(())
}

#[derive(Debug, Default)]
struct BuildStats {
    documents: u64,
    tokens: u64,
    blocks: u64,
    skipped_lines: u64,
}

/// Tokenizes every file in chunks (EOS appended per document when `eos` is given) and
/// writes each group's full blocks.
fn write_blocks(
    config: &PretrainConfig,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
    out: &Path,
) -> Result<BuildStats> {
    let file =
        File::create(out).map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    let mut writer = BlockWriter::new(BufWriter::new(file), config.block_size, group_plan(config)?);
    let mut stats = BuildStats::default();
    for path in &config.files {
        let reader = BufReader::new(
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
        );
        let mut chunk: Vec<(usize, String)> = Vec::with_capacity(LINES_PER_CHUNK);
        for (index, line) in reader.lines().enumerate() {
            let line =
                line.map_err(|e| Error::io(format!("{}:{}", path.display(), index + 1), e))?;
            chunk.push((index + 1, line));
            if chunk.len() == LINES_PER_CHUNK {
                tokenize_chunk(
                    config,
                    tokenizer,
                    path,
                    &chunk,
                    eos,
                    &mut writer,
                    &mut stats,
                )?;
                chunk.clear();
            }
        }
        tokenize_chunk(
            config,
            tokenizer,
            path,
            &chunk,
            eos,
            &mut writer,
            &mut stats,
        )?;
    }
    stats.blocks = writer.finish(out)?;
    if stats.documents == 0 {
        return Err(Error::Data(format!(
            "empty input: no documents in {:?}",
            config.files
        )));
    }
    if stats.blocks == 0 {
        return Err(Error::Data(format!(
            "the corpus has {} tokens, fewer than one block of {}",
            stats.tokens, config.block_size
        )));
    }
    Ok(stats)
}

/// One parsed line: a document's text, a blank line, or a reportable error.
enum Line {
    Text(String),
    Blank,
    Bad(String),
}

fn tokenize_chunk(
    config: &PretrainConfig,
    tokenizer: &Tokenizer,
    path: &Path,
    chunk: &[(usize, String)],
    eos: Option<u32>,
    writer: &mut BlockWriter<impl Write>,
    stats: &mut BuildStats,
) -> Result<()> {
    let parsed: Vec<Line> = chunk
        .par_iter()
        .map(|(number, line)| parse_line(path, *number, line, &config.text_field))
        .collect();
    let mut texts = Vec::with_capacity(parsed.len());
    for line in parsed {
        match line {
            Line::Text(text) => texts.push(text),
            Line::Blank => {}
            Line::Bad(message) if config.skip_bad_lines => {
                tracing::debug!(%message, "skipping bad line");
                stats.skipped_lines += 1;
            }
            Line::Bad(message) => return Err(Error::Data(message)),
        }
    }
    for mut ids in encode_documents(tokenizer, &texts)? {
        ids.extend(eos);
        stats.documents += 1;
        stats.tokens += ids.len() as u64;
        writer.push_document(&ids)?;
    }
    Ok(())
}

/// Documents per `group_texts` call, in order: none to close (the whole corpus), the group
/// size over and over, or — with shards, whose sizes need the document count, the only
/// case that reads the files twice — `group_sizes`.
fn group_plan(config: &PretrainConfig) -> Result<Box<dyn Iterator<Item = usize>>> {
    Ok(match (config.group_documents, config.shards > 1) {
        (None, _) => Box::new(std::iter::empty()),
        (Some(per_group), false) => Box::new(std::iter::repeat(per_group.max(1))),
        (Some(_), true) => {
            let documents = count_documents(&config.files)?;
            Box::new(group_sizes(documents, config).into_iter())
        }
    })
}

/// Documents in `files` as the builder counts them: lines that are not blank.
fn count_documents(files: &[PathBuf]) -> Result<usize> {
    let mut count = 0;
    for path in files {
        let reader = BufReader::new(
            File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?,
        );
        for (index, line) in reader.lines().enumerate() {
            let line =
                line.map_err(|e| Error::io(format!("{}:{}", path.display(), index + 1), e))?;
            count += usize::from(!line.trim().is_empty());
        }
    }
    Ok(count)
}

/// Documents per `group_texts` call, in order: each contiguous shard (sizes as datasets'
/// `shard(contiguous=True)`) cut into groups of `group_documents`.
pub fn group_sizes(documents: usize, config: &PretrainConfig) -> Vec<usize> {
    let Some(per_group) = config.group_documents.map(|g| g.max(1)) else {
        return vec![documents];
    };
    let shards = config.shards.clamp(1, documents.max(1));
    let (base, longer) = (documents / shards, documents % shards);
    let mut groups = Vec::new();
    for shard in 0..shards {
        let mut left = base + usize::from(shard < longer);
        while left > 0 {
            let group = left.min(per_group);
            groups.push(group);
            left -= group;
        }
    }
    groups
}

/// A document longer than this is tokenized in pieces (a whole 50 MB document costs the
/// tokenizer gigabytes of intermediate state).
const MAX_PIECE_BYTES: usize = 1 << 20;
/// Pieces handed to one `encode_batch` call at most, in bytes.
const MAX_BATCH_BYTES: usize = 8 << 20;

/// Token ids of each text as `tokenizer(text)` gives them (special tokens included):
/// short ones in parallel batches, long ones piece by piece when the tokenizer gives the
/// same ids for the pieces as for the whole and adds no special tokens
/// (`split_for_encoding`).
fn encode_documents(tokenizer: &Tokenizer, texts: &[String]) -> Result<Vec<Vec<u32>>> {
    let mut pieces: Vec<(usize, &str)> = Vec::new(); // (document, piece)
    for (document, text) in texts.iter().enumerate() {
        for piece in split_for_encoding(tokenizer, text)? {
            pieces.push((document, piece));
        }
    }
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); texts.len()];
    let mut start = 0;
    while start < pieces.len() {
        let mut end = start + 1;
        let mut bytes = pieces[start].1.len();
        while end < pieces.len() && bytes + pieces[end].1.len() <= MAX_BATCH_BYTES {
            bytes += pieces[end].1.len();
            end += 1;
        }
        let batch: Vec<&str> = pieces[start..end].iter().map(|(_, p)| *p).collect();
        for ((document, _), piece_ids) in pieces[start..end]
            .iter()
            .zip(tokenizer.encode_batch(&batch, true)?)
        {
            ids[*document].extend(piece_ids);
        }
        start = end;
    }
    Ok(ids)
}

/// `text` cut into pieces of about `MAX_PIECE_BYTES`, each cut just before a space that
/// follows a non-space (where byte-level BPE pre-tokenizers start a new word). The cut is
/// used only if this tokenizer adds no special tokens (they would repeat per piece) and
/// encodes the text around the first cut the same in two pieces as in one (a tokenizer
/// that marks piece starts, like SentencePiece's prefix space, does not): otherwise, and
/// for short texts, the text is one piece.
fn split_for_encoding<'t>(tokenizer: &Tokenizer, text: &'t str) -> Result<Vec<&'t str>> {
    let cuts = word_cuts(text, MAX_PIECE_BYTES);
    let Some(&first) = cuts.first() else {
        return Ok(vec![text]);
    };
    if tokenizer.encode("a", true)? != tokenizer.encode("a", false)? {
        return Ok(vec![text]);
    }
    let around = floor_char_boundary(text, first.saturating_sub(4096))
        ..ceil_char_boundary(text, (first + 4096).min(text.len()));
    let whole = tokenizer.encode(&text[around.clone()], false)?;
    let mut split = tokenizer.encode(&text[around.start..first], false)?;
    split.extend(tokenizer.encode(&text[first..around.end], false)?);
    if whole != split {
        return Ok(vec![text]);
    }
    let mut pieces = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for cut in cuts {
        pieces.push(&text[start..cut]);
        start = cut;
    }
    pieces.push(&text[start..]);
    Ok(pieces)
}

/// Byte offsets, about `every` apart, of spaces that follow a non-whitespace byte.
fn word_cuts(text: &str, every: usize) -> Vec<usize> {
    let bytes = text.as_bytes();
    let is_cut = |i: usize| bytes[i] == b' ' && !bytes[i - 1].is_ascii_whitespace();
    let mut cuts = Vec::new();
    let mut from = 0;
    while text.len() - from > every {
        let target = from + every;
        let cut = (from + 1..=target)
            .rev()
            .find(|&i| is_cut(i))
            .or_else(|| (target + 1..bytes.len()).find(|&i| is_cut(i)));
        match cut {
            Some(cut) => {
                cuts.push(cut);
                from = cut;
            }
            None => break,
        }
    }
    cuts
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Parses one JSONL line; errors name `file:line`.
fn parse_line(path: &Path, number: usize, line: &str, field: &str) -> Line {
    if line.trim().is_empty() {
        return Line::Blank;
    }
    let value: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Line::Bad(format!("{}:{number}: {e}", path.display())),
    };
    match value.get(field) {
        Some(serde_json::Value::String(text)) => Line::Text(text.clone()),
        Some(other) => Line::Bad(format!(
            "{}:{number}: text field \"{field}\" is not a string but {}",
            path.display(),
            json_kind(other)
        )),
        None => Line::Bad(format!(
            "{}:{number}: missing text field \"{field}\"",
            path.display()
        )),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Accumulates each group's documents and writes its complete blocks; a group's tail is
/// dropped when its last document is in (and at `finish`).
struct BlockWriter<W: Write> {
    out: W,
    block_size: usize,
    pending: Vec<u32>,
    blocks: u64,
    /// Documents per group still to come, in order, and the current group's.
    groups: Box<dyn Iterator<Item = usize>>,
    group: Option<usize>,
    in_group: usize,
}

impl<W: Write> BlockWriter<W> {
    fn new(out: W, block_size: usize, mut groups: Box<dyn Iterator<Item = usize>>) -> Self {
        BlockWriter {
            out,
            block_size,
            pending: Vec::with_capacity(2 * block_size),
            blocks: 0,
            group: groups.next(),
            groups,
            in_group: 0,
        }
    }

    /// One document's ids; closes the group when it was the group's last document.
    fn push_document(&mut self, ids: &[u32]) -> Result<()> {
        self.push(ids)?;
        self.in_group += 1;
        if self.group == Some(self.in_group) {
            self.group = self.groups.next();
            self.in_group = 0;
            self.pending.clear();
        }
        Ok(())
    }

    fn push(&mut self, ids: &[u32]) -> Result<()> {
        self.pending.extend_from_slice(ids);
        let full = self.pending.len() / self.block_size * self.block_size;
        if full == 0 {
            return Ok(());
        }
        let bytes: Vec<u8> = self.pending[..full]
            .iter()
            .flat_map(|id| id.to_le_bytes())
            .collect();
        self.out
            .write_all(&bytes)
            .map_err(|e| Error::io("writing tokens.bin", e))?;
        self.blocks += (full / self.block_size) as u64;
        self.pending.drain(..full);
        Ok(())
    }

    fn finish(mut self, path: &Path) -> Result<u64> {
        self.out
            .flush()
            .map_err(|e| Error::io(format!("flushing {}", path.display()), e))?;
        Ok(self.blocks)
    }
}

/// run_clm's `group_texts` on in-memory documents (each already ending in EOS): the
/// reference the streaming writer is tested against.
pub fn group_texts(documents: &[Vec<u32>], block_size: usize) -> Vec<Vec<u32>> {
    let concatenated: Vec<u32> = documents.concat();
    let total = concatenated.len() / block_size * block_size;
    concatenated[..total]
        .chunks(block_size)
        .map(<[u32]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_writer_cuts_blocks_and_drops_tail() {
        let mut bytes = Vec::new();
        let mut writer = BlockWriter::new(&mut bytes, 3, Box::new(std::iter::empty()));
        writer.push(&[1, 2]).unwrap();
        writer.push(&[3, 4, 5, 6, 7]).unwrap();
        assert_eq!(writer.finish(Path::new("mem")).unwrap(), 2);
        let ids: Vec<u32> = bytes
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(
            group_texts(&[vec![1, 2], vec![3, 4, 5, 6, 7]], 3),
            vec![vec![1, 2, 3], vec![4, 5, 6]]
        );
    }

    #[test]
    fn each_group_drops_its_own_remainder() {
        let mut bytes = Vec::new();
        let mut writer = BlockWriter::new(&mut bytes, 3, Box::new([2, 1].into_iter()));
        for document in [&[1u32, 2][..], &[3, 4], &[5, 6, 7, 8]] {
            writer.push_document(document).unwrap();
        }
        assert_eq!(writer.finish(Path::new("mem")).unwrap(), 2);
        let ids: Vec<u32> = bytes
            .chunks(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 5, 6, 7]);
    }

    #[test]
    fn groups_follow_contiguous_shards_then_batches() {
        let config = |group_documents, shards| PretrainConfig {
            files: Vec::new(),
            text_field: "text".into(),
            block_size: 4,
            skip_bad_lines: false,
            cache_dir: PathBuf::new(),
            group_documents,
            shards,
            append_eos: false,
        };
        assert_eq!(
            group_sizes(2500, &config(Some(1000), 1)),
            vec![1000, 1000, 500]
        );
        assert_eq!(group_sizes(2500, &config(None, 10)), vec![2500]);
        // 2501 rows in 3 shards: 834, 834, 833.
        assert_eq!(
            group_sizes(2501, &config(Some(500), 3)),
            vec![500, 334, 500, 334, 500, 333]
        );
    }

    #[test]
    fn parse_line_names_file_line_and_field() {
        let p = Path::new("corpus.jsonl");
        assert!(matches!(parse_line(p, 1, "{\"text\": \"a\"}", "text"), Line::Text(t) if t == "a"));
        assert!(matches!(parse_line(p, 2, "  ", "text"), Line::Blank));
        match parse_line(p, 3, "{\"text\": ", "text") {
            Line::Bad(m) => assert!(m.starts_with("corpus.jsonl:3: EOF while parsing"), "{m}"),
            _ => panic!("expected an error"),
        }
        match parse_line(p, 4, "{\"body\": \"x\"}", "text") {
            Line::Bad(m) => assert_eq!(m, "corpus.jsonl:4: missing text field \"text\""),
            _ => panic!("expected an error"),
        }
    }

    #[test]
    fn a_dead_builders_partial_cache_is_removed_and_a_living_ones_kept() {
        let cache = tempfile::tempdir().unwrap();
        let dead = cache.path().join(format!("k1.tmp-{}", u32::MAX / 2));
        let living = cache.path().join(format!("k1.tmp-{}", std::process::id()));
        let other_key = cache.path().join(format!("k2.tmp-{}", u32::MAX / 2));
        for dir in [&dead, &living, &other_key] {
            std::fs::create_dir_all(dir).unwrap();
        }
        remove_dead_builders_leftovers(cache.path(), "k1");
        assert!(!dead.exists());
        assert!(living.is_dir() && other_key.is_dir());
    }

    #[test]
    fn word_cuts_fall_before_a_space_after_a_word() {
        let text = "ab  cd ef\n gh ".repeat(1000);
        let cuts = word_cuts(&text, 100);
        assert!(cuts.len() > 100, "{}", cuts.len());
        let mut from = 0;
        for cut in cuts {
            let b = text.as_bytes();
            assert!(
                b[cut] == b' ' && !b[cut - 1].is_ascii_whitespace(),
                "cut at {cut}"
            );
            assert!(cut - from <= 100, "piece {from}..{cut} too long");
            from = cut;
        }
        assert!(word_cuts("short text", 100).is_empty());
        assert!(
            word_cuts(&"x".repeat(500), 100).is_empty(),
            "no space: one piece"
        );
    }

    #[test]
    fn a_long_document_tokenizes_in_pieces_exactly_as_whole() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        let words = "the river 我们 学习 fn main() { x += 1; }\n\n  indented   spaces, end.";
        std::fs::write(&corpus, words.repeat(50)).unwrap();
        let tokenizer =
            crate::tokenizer::train_bpe(&[&corpus], 400, dir.path().join("tok")).unwrap();
        let long = words.repeat((3 * MAX_PIECE_BYTES) / words.len());
        let pieces = split_for_encoding(&tokenizer, &long).unwrap();
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        let texts = vec!["a short one".to_string(), long.clone()];
        let ids = encode_documents(&tokenizer, &texts).unwrap();
        assert_eq!(ids[0], tokenizer.encode("a short one", false).unwrap());
        assert_eq!(ids[1], tokenizer.encode(&long, false).unwrap());
    }

    #[test]
    fn block_size_check() {
        assert!(check_block_size(512, 512).is_ok());
        let err = check_block_size(1024, 512).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
    }
}
