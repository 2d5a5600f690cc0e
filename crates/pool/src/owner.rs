//! Who a layer belongs to: recorded in its [`crate::LayerRecord`], and
//! reserved in the shape of its id (see [`crate::names::reserved_by`]).
//!
//! What must never happen: ownership inferred from a name where a record
//! says otherwise.

use serde::{Deserialize, Serialize};

/// Who a layer belongs to, recorded when it is made: a front end reuses or
/// removes only its own layers, and a user verb refuses another owner's
/// (ownership is recorded, never inferred from a name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Owner {
    /// Made by hand (`layer create`, `layer apply`, a commit).
    #[default]
    User,
    /// A layer of an imported image (named by its ChainID).
    Image,
    /// A container's init or read-write layer.
    Container,
    /// A volume's device.
    Volume,
    /// The containerd snapshotter's.
    Snapshotter,
    /// The Docker graphdriver's.
    Graphdriver,
    /// A private, short-lived snapshot the engine reads from (a frozen copy).
    Scratch,
}

impl Owner {
    /// The owner's name, as errors and `layer ls` show it.
    pub fn name(self) -> &'static str {
        match self {
            Owner::User => "user",
            Owner::Image => "image",
            Owner::Container => "container",
            Owner::Volume => "volume",
            Owner::Snapshotter => "containerd snapshotter",
            Owner::Graphdriver => "docker graphdriver",
            Owner::Scratch => "scratch",
        }
    }

    /// The command that removes a layer of this owner, for error hints.
    pub fn remove_hint(self) -> &'static str {
        match self {
            Owner::User => "thinlayer layer rm",
            Owner::Image => "thinlayer image rm",
            Owner::Container => "thinlayer container rm",
            Owner::Volume => "thinlayer volume rm",
            Owner::Snapshotter => "ctr snapshots rm (or ctr images rm)",
            Owner::Graphdriver => "docker rm / docker rmi",
            Owner::Scratch => "thinlayer pool recover",
        }
    }
}
