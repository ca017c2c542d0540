//! A minimal TensorBoard event-file writer (scalars only), so `report_to: tensorboard`
//! works without Python. Format contract: TFRecord framing (u64 length, masked CRC32C of
//! the length, payload, masked CRC32C of the payload) around `tensorflow.Event` protobuf
//! messages; the first record carries `file_version = "brain.Event:2"`. The protobuf is
//! encoded by hand: only `Event{wall_time=1, step=2, file_version=3, summary=5}`,
//! `Summary{value=1}` and `Summary.Value{tag=1, simple_value=2}` are needed.

use crate::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends scalar summaries to one `events.out.tfevents.*` file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<secs>.<host>.rsdeep` and writes the header event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let secs = unix_seconds() as u64;
        let host = hostname();
        let path = dir.join(format!("events.out.tfevents.{secs}.{host}.rsdeep"));
        let file = File::create(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let mut writer = EventWriter { file, path };
        let mut event = Vec::new();
        put_double(&mut event, 1, unix_seconds());
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.write_record(&event)?;
        Ok(writer)
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one scalar (`tag` such as `train/loss`) at `step`.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let mut summary_value = Vec::new();
        put_bytes(&mut summary_value, 1, tag.as_bytes());
        put_float(&mut summary_value, 2, value);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &summary_value);
        let mut event = Vec::new();
        put_double(&mut event, 1, unix_seconds());
        put_varint_field(&mut event, 2, step as u64);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    /// Flushes buffered records to disk.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(format!("flushing {}", self.path.display()), e))
    }

    fn write_record(&mut self, payload: &[u8]) -> Result<()> {
        let len = (payload.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(payload.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(payload);
        record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
        self.file
            .write_all(&record)
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }
}

fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, value: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, value);
}

fn put_double(out: &mut Vec<u8>, field: u32, value: f64) {
    put_varint(out, (u64::from(field) << 3) | 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, value: f32) {
    put_varint(out, (u64::from(field) << 3) | 5);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// CRC-32C (Castagnoli), bitwise; records are small so speed does not matter here.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// TFRecord's masking: rotate right by 15 and add a constant.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720 appendix).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn records_are_framed_with_lengths_and_checksums() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let mut writer = EventWriter::create(dir.path())?;
        writer.add_scalar("train/loss", 2.5, 7)?;
        writer.flush()?;
        let bytes = std::fs::read(writer.path()).map_err(|e| Error::io("read", e))?;
        let mut offset = 0;
        let mut records = 0;
        while offset < bytes.len() {
            let len_bytes: [u8; 8] = bytes[offset..offset + 8].try_into().unwrap();
            let len = u64::from_le_bytes(len_bytes) as usize;
            let len_crc = u32::from_le_bytes(bytes[offset + 8..offset + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(&len_bytes));
            let payload = &bytes[offset + 12..offset + 12 + len];
            let crc = u32::from_le_bytes(
                bytes[offset + 12 + len..offset + 16 + len]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(crc, masked_crc32c(payload));
            offset += 16 + len;
            records += 1;
        }
        assert_eq!(records, 2);
        Ok(())
    }
}
