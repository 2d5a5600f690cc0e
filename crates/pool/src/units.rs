//! Sizes and pool block sizes, parsed from human units and checked against
//! the kernel's rules.
//!
//! All sizes are bytes in a [`Bytes`] newtype; conversions to the units the
//! kernel speaks are named for them (`sectors()`, `blocks_of()`), so that a
//! value can never be handed to the kernel in the wrong unit.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One disk sector, the unit of every device-mapper table (`<linux/types.h>`
/// `SECTOR_SHIFT` 9).
pub const SECTOR: u64 = 512;

/// Smallest thin-pool data block: 128 sectors (`DATA_DEV_BLOCK_SIZE_MIN_SECTORS`
/// in `drivers/md/dm-thin.c`).
pub const MIN_BLOCK: u64 = 64 << 10;

/// Largest thin-pool data block: 2,097,152 sectors
/// (`DATA_DEV_BLOCK_SIZE_MAX_SECTORS` in `drivers/md/dm-thin.c`).
pub const MAX_BLOCK: u64 = 1 << 30;

/// Smallest metadata device the tools accept (`thin_metadata_size` floor).
pub const MIN_METADATA: u64 = 2 << 20;

/// Largest useful metadata device: the kernel uses at most 16 GiB minus
/// 4 MiB of it (`THIN_METADATA_MAX_SECTORS` in `dm-thin-metadata.h`).
pub const MAX_METADATA: u64 = (16 << 30) - (4 << 20);

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    /// The size in 512-byte sectors, rounded down.
    pub fn sectors(self) -> u64 {
        self.0 / SECTOR
    }

    /// How many whole `block`s this size holds.
    pub fn blocks_of(self, block: BlockSize) -> u64 {
        self.0 / block.bytes().0
    }
}

const SUFFIXES: [(&str, u32); 6] = [
    ("K", 10),
    ("M", 20),
    ("G", 30),
    ("T", 40),
    ("P", 50),
    ("E", 60),
];

impl FromStr for Bytes {
    type Err = Error;

    /// Parses `4096`, `64K`, `64KiB`, `1.5G`, `20g`, `10GB` (binary units:
    /// K = 1024). Fractions are allowed when the result is a whole byte.
    fn from_str(input: &str) -> Result<Bytes> {
        let bad = |reason: &str| Error::InvalidSize {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        if number.is_empty() {
            return Err(bad("it does not start with a number"));
        }
        let unit = unit.trim().to_ascii_uppercase();
        let unit = unit
            .strip_suffix("IB")
            .or_else(|| unit.strip_suffix('B'))
            .unwrap_or(&unit);
        let shift = match unit {
            "" => 0,
            u => SUFFIXES
                .iter()
                .find(|(name, _)| *name == u)
                .map(|(_, shift)| *shift)
                .ok_or_else(|| bad("unknown unit; use K, M, G, T (powers of 1024)"))?,
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if frac.contains('.') {
            return Err(bad("it has two decimal points"));
        }
        let whole: u64 = whole.parse().map_err(|_| bad("not a number"))?;
        let mut bytes = whole
            .checked_mul(1u64 << shift)
            .ok_or_else(|| bad("too large"))?;
        if !frac.is_empty() {
            let digits: u32 = frac.len().try_into().map_err(|_| bad("too many digits"))?;
            let num: u128 = frac.parse().map_err(|_| bad("not a number"))?;
            let den = 10u128
                .checked_pow(digits)
                .ok_or_else(|| bad("too many digits"))?;
            let scaled = num * (1u128 << shift);
            if !scaled.is_multiple_of(den) {
                return Err(bad("it is not a whole number of bytes"));
            }
            let extra = u64::try_from(scaled / den).map_err(|_| bad("too large"))?;
            bytes = bytes.checked_add(extra).ok_or_else(|| bad("too large"))?;
        }
        Ok(Bytes(bytes))
    }
}

impl fmt::Display for Bytes {
    /// Exact when the size is a whole number of its largest unit (`64K`,
    /// `20G`), else one decimal (`1.5G`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (name, shift) in SUFFIXES.iter().rev() {
            let unit = 1u64 << shift;
            if n >= unit {
                return if n.is_multiple_of(unit) {
                    write!(f, "{}{name}", n / unit)
                } else {
                    // Display only: precision loss past 2^53 bytes is harmless.
                    #[allow(clippy::cast_precision_loss)]
                    let v = n as f64 / unit as f64;
                    write!(f, "{v:.1}{name}")
                };
            }
        }
        write!(f, "{n}")
    }
}

/// A thin-pool data block size: a multiple of 64 KiB from 64 KiB to 1 GiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct BlockSize(Bytes);

impl BlockSize {
    /// The default, 64 KiB: the smallest copy-on-write unit the kernel allows.
    pub const DEFAULT: BlockSize = BlockSize(Bytes(MIN_BLOCK));

    /// Checks `size` against the kernel's rules.
    ///
    /// # Errors
    /// [`Error::InvalidSize`] naming the rule that failed.
    pub fn new(size: Bytes) -> Result<BlockSize> {
        let bad = |reason: String| Error::InvalidSize {
            input: size.to_string(),
            reason,
        };
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&size.0) {
            return Err(bad(format!(
                "a pool block size must be between {} and {}",
                Bytes(MIN_BLOCK),
                Bytes(MAX_BLOCK)
            )));
        }
        if !size.0.is_multiple_of(MIN_BLOCK) {
            return Err(bad(format!(
                "a pool block size must be a multiple of {}",
                Bytes(MIN_BLOCK)
            )));
        }
        Ok(BlockSize(size))
    }

    /// The size in bytes.
    pub fn bytes(self) -> Bytes {
        self.0
    }

    /// The size in sectors, as the thin-pool table takes it.
    pub fn sectors(self) -> u64 {
        self.0.sectors()
    }
}

impl TryFrom<u64> for BlockSize {
    type Error = Error;
    fn try_from(v: u64) -> Result<BlockSize> {
        BlockSize::new(Bytes(v))
    }
}

impl From<BlockSize> for u64 {
    fn from(b: BlockSize) -> u64 {
        b.0.0
    }
}

impl FromStr for BlockSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<BlockSize> {
        BlockSize::new(s.parse()?)
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The metadata size `thin_metadata_size` would advise for a pool of
/// `data` bytes in `block`s holding up to `max_thins` thin devices, rounded
/// up to a MiB and clamped to what the kernel uses.
///
/// The tools' estimate is 64 bytes per data block for the mapping btrees,
/// plus 64 bytes per thin device, plus 2 MiB of fixed overhead
/// (thin-provisioning-tools `thin_metadata_size`); we double the mapping
/// part, because every snapshot that shares a block and then breaks sharing
/// adds a mapping of its own.
pub fn default_metadata_size(data: Bytes, block: BlockSize, max_thins: u64) -> Bytes {
    let blocks = data.blocks_of(block);
    let estimate = 2 * 64 * blocks + 64 * max_thins + MIN_METADATA;
    let mib = 1u64 << 20;
    let rounded = estimate.div_ceil(mib) * mib;
    Bytes(rounded.clamp(8 * mib, MAX_METADATA))
}

/// One past the largest thin device id: `dm_thin_id` is declared in
/// `drivers/md/dm-thin-metadata.h`, and `drivers/md/dm-thin.c` caps it at
/// `MAX_DEV_ID ((1 << 24) - 1)`; the `devicemapper` crate's `ThinDevId`
/// enforces the same 24 bits.
pub const THIN_ID_LIMIT: u32 = 1 << 24;

/// A dm-thin device id, checked in its constructor to fit the kernel's 24
/// bits, so an out-of-range id never reaches a pool message or a table.
/// Stored as its bare number (`#[serde(transparent)]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ThinId(u32);

impl ThinId {
    /// The largest id the kernel accepts, 2^24 - 1.
    pub const MAX: ThinId = ThinId(THIN_ID_LIMIT - 1);

    /// Checks `id` against the kernel's 24 bits.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] past 2^24 - 1.
    pub fn new(id: u32) -> Result<ThinId> {
        if id < THIN_ID_LIMIT {
            Ok(ThinId(id))
        } else {
            Err(Error::InvalidArgument(format!(
                "thin id {id} is out of range: dm-thin ids are 24 bits (at most {})",
                THIN_ID_LIMIT - 1
            )))
        }
    }

    /// The id as a number.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for ThinId {
    type Error = Error;
    fn try_from(id: u32) -> Result<ThinId> {
        ThinId::new(id)
    }
}

impl TryFrom<u64> for ThinId {
    type Error = Error;
    fn try_from(id: u64) -> Result<ThinId> {
        u32::try_from(id)
            .map_err(|_| Error::InvalidArgument(format!("thin id {id} is out of range")))
            .and_then(ThinId::new)
    }
}

impl From<ThinId> for u32 {
    fn from(id: ThinId) -> u32 {
        id.0
    }
}

impl From<ThinId> for devicemapper::ThinDevId {
    fn from(id: ThinId) -> devicemapper::ThinDevId {
        devicemapper::ThinDevId::new_u64(u64::from(id.0))
            .expect("a ThinId is checked to fit 24 bits in its constructor")
    }
}

impl From<devicemapper::ThinDevId> for ThinId {
    fn from(id: devicemapper::ThinDevId) -> ThinId {
        ThinId(u32::from(id))
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl<'de> Deserialize<'de> for ThinId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<ThinId, D::Error> {
        ThinId::new(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_id_is_24_bits() {
        assert_eq!(ThinId::new(0).unwrap().get(), 0);
        assert_eq!(ThinId::new(0xFF_FFFF).unwrap(), ThinId::MAX);
        assert!(ThinId::new(0x100_0000).is_err());
        assert!(ThinId::try_from(u64::from(u32::MAX) + 1).is_err());
        let dm: devicemapper::ThinDevId = ThinId::MAX.into();
        assert_eq!(ThinId::from(dm), ThinId::MAX);
        assert_eq!(ThinId::new(7).unwrap().to_string(), "7");
        assert_eq!(
            serde_json::to_string(&ThinId::new(42).unwrap()).unwrap(),
            "42"
        );
        assert_eq!(serde_json::from_str::<ThinId>("42").unwrap().get(), 42);
        assert!(serde_json::from_str::<ThinId>("16777216").is_err());
    }

    #[test]
    fn parses_human_units() {
        let cases = [
            ("4096", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("20G", 20 << 30),
            ("20GB", 20 << 30),
            ("1.5G", 3 << 29),
            ("1T", 1 << 40),
            (" 2M ", 2 << 20),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Bytes>().unwrap(), Bytes(want), "{input}");
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        for input in [
            "",
            "G",
            "-1G",
            "1X",
            "1.2.3G",
            "0.3",
            "99999999999E",
            "1.0000000000000000000000001K",
        ] {
            let err = input.parse::<Bytes>().unwrap_err();
            assert!(matches!(err, Error::InvalidSize { .. }), "{input}: {err}");
        }
    }

    #[test]
    fn displays_round_trip() {
        for input in ["64K", "20G", "1.5G", "512", "1M"] {
            let b: Bytes = input.parse().unwrap();
            assert_eq!(b.to_string(), input);
        }
    }

    #[test]
    fn block_size_follows_kernel_rules() {
        assert_eq!(BlockSize::DEFAULT.sectors(), 128);
        assert!("64K".parse::<BlockSize>().is_ok());
        assert!("1G".parse::<BlockSize>().is_ok());
        assert!("192K".parse::<BlockSize>().is_ok());
        for bad in ["32K", "96K", "2G", "4K", "0"] {
            let err = bad.parse::<BlockSize>().unwrap_err();
            assert!(err.to_string().contains("pool block size"), "{bad}: {err}");
        }
    }

    #[test]
    fn metadata_default_scales_with_blocks() {
        let small = default_metadata_size(Bytes(1 << 30), BlockSize::DEFAULT, 1000);
        let big = default_metadata_size(Bytes(1 << 40), BlockSize::DEFAULT, 1000);
        let coarse = default_metadata_size(Bytes(1 << 40), "1M".parse().unwrap(), 1000);
        assert_eq!(small, Bytes(8 << 20), "floor of 8 MiB");
        assert!(big > coarse && coarse > small);
        assert_eq!(big.0 % (1 << 20), 0);
        assert!(big.0 <= MAX_METADATA);
    }
}
