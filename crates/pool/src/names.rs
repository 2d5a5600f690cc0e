//! Every device-mapper name and uuid thinlayer uses is built here, and only
//! here, so that names are deterministic, never collide between pools, and
//! stay inside the kernel's limits.
//!
//! A name is `tl<FORMAT>-<pool id>-<role>`; the uuid is
//! `THINLAYER-<FORMAT>-<pool id>-<role>`. Any device whose uuid starts with
//! [`uuid_prefix`] belongs to that pool, which is how teardown and recovery
//! find every device of a pool without trusting the records.

use std::fmt;

use devicemapper::{DmNameBuf, DmUuidBuf};

use crate::{
    error::{Error, Result},
    owner::Owner,
};

/// Bumped when the naming scheme changes, so old devices are recognisable.
pub const FORMAT: u32 = 1;

/// The kernel's limit on a dm name, without the NUL (`DM_NAME_LEN` 128 in
/// `<linux/dm-ioctl.h>`).
pub const DM_NAME_MAX: usize = 127;

/// The role a device plays in a pool: the suffix of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The linear device over the metadata loop device.
    Meta,
    /// The linear device over the data loop device.
    Data,
    /// The thin-pool itself.
    Pool,
    /// A thin device, by its thin id (24 bits).
    Thin(u32),
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Meta => f.write_str("meta"),
            Role::Data => f.write_str("data"),
            Role::Pool => f.write_str("pool"),
            Role::Thin(id) => write!(f, "thin-{id}"),
        }
    }
}

/// A pool's id: 8 lower-case hex digits, fixed when the pool is created.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PoolId(String);

impl PoolId {
    /// Checks that `s` is 8 lower-case hex digits.
    ///
    /// # Errors
    /// [`Error::InvalidName`] otherwise.
    pub fn new(s: &str) -> Result<PoolId> {
        if s.len() == 8
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(PoolId(s.to_owned()))
        } else {
            Err(Error::InvalidName {
                name: s.to_owned(),
                reason: "a pool id is 8 lower-case hex digits".into(),
            })
        }
    }

    /// A fresh id from the clock, the pid and the root path, so that two
    /// pools on one host (or one machine's pool restored on another) differ.
    pub fn generate(seed: &str) -> PoolId {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let mut h = crc32fast::Hasher::new();
        h.update(&now.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        h.update(seed.as_bytes());
        PoolId(format!("{:08x}", h.finalize()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PoolId {
    type Error = Error;
    fn try_from(s: String) -> Result<PoolId> {
        PoolId::new(&s)
    }
}

impl From<PoolId> for String {
    fn from(p: PoolId) -> String {
        p.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dm name of `role` in `pool`.
///
/// Worst case: `tl` + 10 digits of format + `-` + 8 + `-thin-` + 8 digits of
/// a 24-bit id = 35 bytes, far below [`DM_NAME_MAX`].
pub fn dm_name(pool: &PoolId, role: Role) -> DmNameBuf {
    let name = format!("tl{FORMAT}-{pool}-{role}");
    debug_assert!(name.len() <= DM_NAME_MAX);
    DmNameBuf::new(name).expect("at most 35 bytes of [a-z0-9-]: a valid dm name")
}

/// The dm uuid of `role` in `pool`.
///
/// Worst case: `THINLAYER-` 10 + 10 digits + `-` + 8 + `-thin-` + 8 = 43
/// bytes, below the kernel's 128 (`DM_UUID_LEN`).
pub fn dm_uuid(pool: &PoolId, role: Role) -> DmUuidBuf {
    DmUuidBuf::new(format!("{}{role}", uuid_prefix(pool)))
        .expect("at most 43 bytes of [A-Za-z0-9-]: a valid dm uuid")
}

/// The uuid prefix shared by every device of `pool`.
pub fn uuid_prefix(pool: &PoolId) -> String {
    format!("THINLAYER-{FORMAT}-{pool}-")
}

/// The dm name prefix shared by every device of `pool`.
pub fn name_prefix(pool: &PoolId) -> String {
    format!("tl{FORMAT}-{pool}-")
}

/// Parses the role back out of a dm name of `pool`; `None` for a name that
/// is not one of this pool's.
pub fn parse_role(pool: &PoolId, name: &str) -> Option<Role> {
    let role = name.strip_prefix(&name_prefix(pool))?;
    match role {
        "meta" => Some(Role::Meta),
        "data" => Some(Role::Data),
        "pool" => Some(Role::Pool),
        r => r.strip_prefix("thin-")?.parse().ok().map(Role::Thin),
    }
}

/// Checks a layer (or later image, container, volume) id given by a user:
/// 1 to 128 bytes of `[A-Za-z0-9_.:-]`, starting with a letter or digit, so
/// it is safe as a file name and in messages.
///
/// # Errors
/// [`Error::InvalidName`] with the rule.
pub fn check_id(kind: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: id.to_owned(),
            reason: format!(
                "a {kind} id is 1 to 128 characters of letters, digits, '_', '.', ':' and '-', starting with a letter or digit"
            ),
        })
    }
}

/// The owner that reserves ids of `id`'s form, if any: `vol-*` (volumes),
/// `ctrd-*` (the containerd snapshotter), `scratch-*` (the engine's private
/// snapshots), `sha256:*` (image layers, named by ChainID), then `*-rw` and
/// `*-init` (containers). Prefixes win over suffixes, so `vol-x-rw` is a
/// volume's. The one place the reserved forms are written down; only user
/// verbs call it (ownership itself is recorded, never read from a name).
pub fn reserved_by(id: &str) -> Option<Owner> {
    const PREFIXES: [(&str, Owner); 5] = [
        ("vol-", Owner::Volume),
        ("ctrd-", Owner::Snapshotter),
        ("docker-", Owner::Graphdriver),
        ("scratch-", Owner::Scratch),
        ("sha256:", Owner::Image),
    ];
    const SUFFIXES: [(&str, Owner); 2] = [("-rw", Owner::Container), ("-init", Owner::Container)];
    PREFIXES
        .iter()
        .find(|(p, _)| id.starts_with(p))
        .or_else(|| SUFFIXES.iter().find(|(s, _)| id.ends_with(s)))
        .map(|&(_, o)| o)
}

/// Checks an id a user verb is about to give a new `kind` (layer, volume,
/// container layer): [`check_id`], and none of the forms [`reserved_by`]
/// another owner than `owner`.
///
/// # Errors
/// [`Error::InvalidName`] naming the owner and its command.
pub fn check_user_id(kind: &str, id: &str, owner: Owner) -> Result<()> {
    check_id(kind, id)?;
    match reserved_by(id) {
        Some(o) if o != owner => Err(Error::InvalidName {
            name: id.to_owned(),
            reason: format!(
                "ids of this form are reserved for the {}'s layers; pick another name",
                o.name()
            ),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_fit() {
        let pool = PoolId::new("0123abcd").unwrap();
        for role in [
            Role::Meta,
            Role::Data,
            Role::Pool,
            Role::Thin(0),
            Role::Thin(0xFF_FFFF),
        ] {
            let name = dm_name(&pool, role);
            assert!(name.to_string().len() <= DM_NAME_MAX);
            assert_eq!(parse_role(&pool, &name.to_string()), Some(role));
            assert!(
                dm_uuid(&pool, role)
                    .to_string()
                    .starts_with(&uuid_prefix(&pool))
            );
        }
        assert_eq!(
            dm_name(&pool, Role::Thin(7)).to_string(),
            "tl1-0123abcd-thin-7"
        );
        let other = PoolId::new("ffffffff").unwrap();
        assert_eq!(parse_role(&other, "tl1-0123abcd-pool"), None);
        assert_eq!(parse_role(&pool, "tl1-0123abcd-thin-x"), None);
    }

    #[test]
    fn pool_ids_are_checked() {
        assert!(PoolId::new("0123abcd").is_ok());
        for bad in ["", "0123abc", "0123ABCD", "0123abcg", "0123abcd0"] {
            assert!(PoolId::new(bad).is_err(), "{bad}");
        }
        assert!(PoolId::new(PoolId::generate("/x").as_str()).is_ok());
    }

    #[test]
    fn reserved_forms_name_their_owner() {
        for (id, owner) in [
            ("vol-data", Some(Owner::Volume)),
            ("vol-x-rw", Some(Owner::Volume)),
            ("ctrd-12", Some(Owner::Snapshotter)),
            ("scratch-1", Some(Owner::Scratch)),
            ("sha256:abc", Some(Owner::Image)),
            ("web-rw", Some(Owner::Container)),
            ("web-init", Some(Owner::Container)),
            ("web", None),
            ("volume", None),
            ("rw", None),
            ("initial", None),
        ] {
            assert_eq!(reserved_by(id), owner, "{id}");
        }
        check_user_id("layer", "mine", Owner::User).unwrap();
        check_user_id("layer", "web-rw", Owner::Container).unwrap();
        let e = check_user_id("layer", "vol-data", Owner::User).unwrap_err();
        assert!(
            e.to_string().contains("reserved for the volume's layers"),
            "{e}"
        );
        let e = check_user_id("layer", "sha256:00", Owner::User).unwrap_err();
        assert!(e.to_string().contains("image"), "{e}");
        assert!(check_user_id("layer", "../x", Owner::User).is_err());
    }

    #[test]
    fn ids_are_checked() {
        for good in ["a", "base", "sha256:abc", "L1.x_y-z", &"a".repeat(128)] {
            check_id("layer", good).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-flag",
            "a/b",
            "a b",
            "../x",
            &"a".repeat(129),
            "é",
        ] {
            let err = check_id("layer", bad).unwrap_err();
            assert!(err.to_string().contains("layer id"), "{bad}: {err}");
        }
    }
}
