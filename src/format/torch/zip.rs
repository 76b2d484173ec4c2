//! The zip container of a `torch.save` file, read strictly.
//!
//! PyTorch writes its archives with miniz: every record is STORED (not
//! compressed), so each record's bytes sit in the file as they are and a
//! tensor's storage can be read, and rewritten, in place. What we need from
//! the zip is where each record's data is and where its CRC-32 is written
//! (the local header, or the data descriptor after the data when flag bit 3
//! is set, and the central directory): a checkout of lossy-coded tensors
//! changes the data, so the CRCs have to be written anew.

/// One record of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// Absolute offset of the first data byte.
    pub data_start: u64,
    pub len: u64,
    pub crc: u32,
    /// Every absolute offset at which this record's CRC-32 is stored.
    pub crc_fields: Vec<u64>,
}

impl Record {
    pub fn data_end(&self) -> u64 {
        self.data_start + self.len
    }
}

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const END_SIG: u32 = 0x0605_4b50;
const END64_SIG: u32 = 0x0606_4b50;
const END64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
/// Flag bit 3: sizes and CRC follow the data in a data descriptor.
const HAS_DESCRIPTOR: u16 = 1 << 3;
/// Flag bit 0: encrypted.
const ENCRYPTED: u16 = 1;

/// A little-endian reader over the file that reports positions in errors.
struct At<'a> {
    bytes: &'a [u8],
}

impl At<'_> {
    fn slice(&self, at: u64, len: u64) -> Result<&[u8], String> {
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len() as u64)
            .ok_or_else(|| {
                format!(
                    "zip structure at byte {at} runs past the end of the file ({} bytes)",
                    self.bytes.len()
                )
            })?;
        Ok(&self.bytes[at as usize..end as usize])
    }
    fn u16(&self, at: u64) -> Result<u16, String> {
        Ok(u16::from_le_bytes(
            self.slice(at, 2)?.try_into().expect("2"),
        ))
    }
    fn u32(&self, at: u64) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.slice(at, 4)?.try_into().expect("4"),
        ))
    }
    fn u64(&self, at: u64) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.slice(at, 8)?.try_into().expect("8"),
        ))
    }
}

/// The records of the archive `bytes`, in central-directory order.
/// Refuses compressed, encrypted or inconsistent records: this reader never
/// guesses.
pub fn records(bytes: &[u8]) -> Result<Vec<Record>, String> {
    let at = At { bytes };
    let (count, dir_start, dir_len) = central_directory(&at)?;
    let mut records = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut pos = dir_start;
    for _ in 0..count {
        let (record, next) = central_entry(&at, pos)?;
        records.push(record);
        pos = next;
    }
    if pos != dir_start + dir_len {
        return Err(format!(
            "central directory is {dir_len} bytes but its {count} entries take {}",
            pos - dir_start
        ));
    }
    let mut spans: Vec<(u64, u64, &str)> = records
        .iter()
        .map(|r| (r.data_start, r.data_end(), r.name.as_str()))
        .collect();
    spans.sort();
    if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
        return Err(format!("records `{}` and `{}` overlap", w[0].2, w[1].2));
    }
    Ok(records)
}

/// (entry count, offset, length) of the central directory, from the end
/// record (and its zip64 form when the 32-bit fields overflowed).
fn central_directory(at: &At<'_>) -> Result<(u64, u64, u64), String> {
    let len = at.bytes.len() as u64;
    // The end record is 22 bytes plus a comment of up to 65535 bytes.
    let search_from = len.saturating_sub(22 + 65_535);
    let end = (search_from..=len.saturating_sub(22))
        .rev()
        .find(|&p| at.u32(p) == Ok(END_SIG))
        .ok_or("no end-of-central-directory record (not a zip archive)")?;
    let count = u64::from(at.u16(end + 10)?);
    let dir_len = u64::from(at.u32(end + 12)?);
    let dir_start = u64::from(at.u32(end + 16)?);
    let overflowed = count == 0xFFFF || dir_len == 0xFFFF_FFFF || dir_start == 0xFFFF_FFFF;
    let has_locator = end >= 20 && at.u32(end - 20) == Ok(END64_LOCATOR_SIG);
    if !(overflowed || has_locator) {
        return Ok((count, dir_start, dir_len));
    }
    if !has_locator {
        return Err("zip64 sizes without a zip64 end locator".into());
    }
    let end64 = at.u64(end - 20 + 8)?;
    if at.u32(end64)? != END64_SIG {
        return Err(format!("no zip64 end record at byte {end64}"));
    }
    Ok((
        at.u64(end64 + 32)?,
        at.u64(end64 + 48)?,
        at.u64(end64 + 40)?,
    ))
}

/// The central entry at `pos` with its local header checked against it;
/// returns the record and the next entry's position.
fn central_entry(at: &At<'_>, pos: u64) -> Result<(Record, u64), String> {
    if at.u32(pos)? != CENTRAL_SIG {
        return Err(format!("no central directory entry at byte {pos}"));
    }
    let flags = at.u16(pos + 8)?;
    let method = at.u16(pos + 10)?;
    let crc = at.u32(pos + 16)?;
    let mut compressed = u64::from(at.u32(pos + 20)?);
    let mut size = u64::from(at.u32(pos + 24)?);
    let name_len = u64::from(at.u16(pos + 28)?);
    let extra_len = u64::from(at.u16(pos + 30)?);
    let comment_len = u64::from(at.u16(pos + 32)?);
    let mut local = u64::from(at.u32(pos + 42)?);
    let name = String::from_utf8(at.slice(pos + 46, name_len)?.to_vec())
        .map_err(|_| format!("record name at byte {pos} is not UTF-8"))?;
    let extra = at.slice(pos + 46 + name_len, extra_len)?;
    apply_zip64(extra, &mut size, &mut compressed, &mut local)
        .map_err(|e| format!("record `{name}`: {e}"))?;
    if flags & ENCRYPTED != 0 {
        return Err(format!("record `{name}` is encrypted"));
    }
    if method != 0 {
        return Err(format!(
            "record `{name}` is compressed (method {method}); torch writes stored records"
        ));
    }
    if compressed != size {
        return Err(format!(
            "record `{name}` is stored but its sizes differ ({compressed} and {size})"
        ));
    }
    let mut crc_fields = vec![pos + 16];
    let data_start = local_data_start(at, local, &name)?;
    if flags & HAS_DESCRIPTOR != 0 {
        let after = data_start + size;
        let crc_at = if at.u32(after) == Ok(DESCRIPTOR_SIG) {
            after + 4
        } else {
            after
        };
        if at.u32(crc_at)? != crc {
            return Err(format!(
                "record `{name}`: data descriptor CRC disagrees with the central directory"
            ));
        }
        crc_fields.push(crc_at);
    } else {
        if at.u32(local + 14)? != crc {
            return Err(format!(
                "record `{name}`: local header CRC disagrees with the central directory"
            ));
        }
        crc_fields.push(local + 14);
    }
    let record = Record {
        name,
        data_start,
        len: size,
        crc,
        crc_fields,
    };
    Ok((record, pos + 46 + name_len + extra_len + comment_len))
}

/// Offset of the data after the local header at `local`.
fn local_data_start(at: &At<'_>, local: u64, name: &str) -> Result<u64, String> {
    if at.u32(local)? != LOCAL_SIG {
        return Err(format!("record `{name}`: no local header at byte {local}"));
    }
    let name_len = u64::from(at.u16(local + 26)?);
    let extra_len = u64::from(at.u16(local + 28)?);
    if at.slice(local + 30, name_len)? != name.as_bytes() {
        return Err(format!(
            "record `{name}`: local header names another record"
        ));
    }
    Ok(local + 30 + name_len + extra_len)
}

/// Replaces the 32-bit fields that overflowed with their zip64 values, which
/// appear in this order and only for the fields set to all ones.
fn apply_zip64(
    mut extra: &[u8],
    size: &mut u64,
    compressed: &mut u64,
    local: &mut u64,
) -> Result<(), String> {
    let wants = [*size, *compressed, *local].map(|v| v == 0xFFFF_FFFF);
    if !wants.contains(&true) {
        return Ok(());
    }
    while extra.len() >= 4 {
        let id = u16::from_le_bytes([extra[0], extra[1]]);
        let len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
        let body = extra
            .get(4..4 + len)
            .ok_or("extra field runs past its end")?;
        if id == 1 {
            let mut values = body
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8")));
            for (field, wanted) in [size, compressed, local].into_iter().zip(wants) {
                if wanted {
                    *field = values.next().ok_or("zip64 extra field is too short")?;
                }
            }
            return Ok(());
        }
        extra = &extra[4 + len..];
    }
    Err("32-bit size or offset is all ones but there is no zip64 extra field".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal stored archive, as miniz writes one with data descriptors.
    pub(crate) fn archive(records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in records {
            let crc = crc32fast::hash(data);
            let local = out.len() as u32;
            out.extend(LOCAL_SIG.to_le_bytes());
            out.extend(20u16.to_le_bytes());
            out.extend(HAS_DESCRIPTOR.to_le_bytes());
            out.extend([0u8; 2 + 4 + 4 + 4 + 4]);
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(*data);
            out.extend(DESCRIPTOR_SIG.to_le_bytes());
            out.extend(crc.to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            central.extend(CENTRAL_SIG.to_le_bytes());
            central.extend([20, 0, 20, 0]);
            central.extend(HAS_DESCRIPTOR.to_le_bytes());
            central.extend([0u8; 6]);
            central.extend(crc.to_le_bytes());
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((data.len() as u32).to_le_bytes());
            central.extend((name.len() as u16).to_le_bytes());
            central.extend([0u8; 12]);
            central.extend(local.to_le_bytes());
            central.extend(name.as_bytes());
        }
        let dir_start = out.len() as u32;
        out.extend(&central);
        out.extend(END_SIG.to_le_bytes());
        out.extend([0u8; 4]);
        out.extend((records.len() as u16).to_le_bytes());
        out.extend((records.len() as u16).to_le_bytes());
        out.extend((central.len() as u32).to_le_bytes());
        out.extend(dir_start.to_le_bytes());
        out.extend([0u8; 2]);
        out
    }

    #[test]
    fn finds_data_and_every_crc_field() {
        let bytes = archive(&[("a/data.pkl", b"pickle"), ("a/data/0", &[1, 2, 3, 4])]);
        let recs = records(&bytes).unwrap();
        assert_eq!(recs.len(), 2);
        let r = &recs[1];
        assert_eq!(r.name, "a/data/0");
        assert_eq!(
            &bytes[r.data_start as usize..r.data_end() as usize],
            &[1, 2, 3, 4]
        );
        assert_eq!(r.crc, crc32fast::hash(&[1, 2, 3, 4]));
        assert_eq!(r.crc_fields.len(), 2);
        for &f in &r.crc_fields {
            assert_eq!(&bytes[f as usize..f as usize + 4], &r.crc.to_le_bytes());
        }
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let good = archive(&[("a/data/0", &[9; 16])]);
        assert!(records(b"not a zip at all, just some bytes").is_err());
        let mut bad_crc = good.clone();
        let f = records(&good).unwrap()[0].crc_fields[1] as usize;
        bad_crc[f] ^= 1;
        assert!(records(&bad_crc).unwrap_err().contains("CRC"));
        let mut compressed = good.clone();
        let dir = records(&good).unwrap()[0].crc_fields[0] as usize - 16;
        compressed[dir + 10] = 8;
        assert!(records(&compressed).unwrap_err().contains("compressed"));
        for cut in [1, 10, 30, good.len() / 2] {
            assert!(records(&good[..good.len() - cut]).is_err(), "cut {cut}");
        }
    }
}
