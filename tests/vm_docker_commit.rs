//! `docker commit` of a large change under `-s thinlayer` (issue #13's
//! bug): dockerd streams the container layer's `Diff` answer straight into
//! the new layer's `ApplyDiff` request, so the plugin must serve both at
//! once. Before the fix the Diff held the plugin's lock for its whole
//! stream and the ApplyDiff waited for it: a change of about 1 MiB or more
//! hung the commit.

mod common;

use common::docker::{
    Dockerd, docker_layers, docker_layers_settled, finish_clean, fixture, plugin, require_docker,
};
use common::{Pool, vm_test};

/// A 64 MiB file of a known pattern (64 blocks of 1 MiB, each 65,536
/// numbered 16-byte lines after its own 16-byte block header), and small
/// files, written by the container; prints the big file's sha256.
const WRITE: &str = "awk 'BEGIN { for (l = 0; l < 65536; l++) printf \"%015d\\n\", l }' > /m && \
                     for b in $(seq 0 63); do printf 'block-%09d\\n' $b; cat /m; done > /big.bin && \
                     rm /m && echo one > /small-1 && mkdir -p /d && echo two > /d/small-2 && \
                     ln -s small-1 /small-link && sha256sum /big.bin | cut -d' ' -f1";

/// The big file's size.
const BIG: usize = 64 * ((1 << 20) + 16);

const READ: &str = "sha256sum /big.bin | cut -d' ' -f1; stat -c %s /big.bin; \
                    cat /small-1 /d/small-2; readlink /small-link";

#[test]
fn vm_docker_commit_of_a_large_change() {
    vm_test("docker-commit", Pool::Small, |s| {
        require_docker();
        let devices_before = common::dm_devices();
        let base = s.root.parent().unwrap().to_path_buf();
        let mut p = plugin(s);
        let mut d = Dockerd::start(&base.join("data"), "commit", "thinlayer", &[]);
        let loaded = d.ok(&["load", "-i", fixture("demo-docker.tar").to_str().unwrap()]);
        assert!(loaded.contains("Loaded image: demo:docker"), "{loaded}");
        let image_layers = docker_layers(s).len();

        let written = d.ok(&["run", "--name", "big", "demo:docker", "sh", "-c", WRITE]);
        assert_eq!(written.len(), 64, "a sha256: {written}");

        // The commit streams the 64 MiB layer from Diff into ApplyDiff.
        d.ok(&["commit", "big", "demo:big"]);
        let back = d.ok(&["run", "--rm", "demo:big", "sh", "-c", READ]);
        assert_eq!(
            back,
            format!("{written}\n{BIG}\none\ntwo\nsmall-1"),
            "the committed image holds the container's change"
        );
        // A second commit of the same container (a Diff of the same layer
        // again) while the image of the first is in use.
        d.ok(&["create", "--name", "user", "demo:big", "true"]);
        d.ok(&["commit", "big", "demo:big2"]);
        assert_eq!(
            d.ok(&["run", "--rm", "demo:big2", "sh", "-c", READ]),
            back,
            "a second commit holds the same"
        );

        // rm and rmi clean up: only the image's layers are left, no stream's.
        d.ok(&["rm", "user", "big"]);
        d.ok(&["rmi", "demo:big", "demo:big2"]);
        let layers = docker_layers_settled(s, image_layers);
        assert_eq!(layers.len(), image_layers, "{layers:?}");
        finish_clean(s, &mut d, &mut p, &devices_before);
    });
}
