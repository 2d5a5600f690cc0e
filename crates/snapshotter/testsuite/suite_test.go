// containerd's generic snapshotter test suite against `thinlayer serve
// containerd`, through containerd's own proxy snapshotter client (the code
// containerd uses for a [proxy_plugins] snapshotter).
//
// Built on the host, offline, against Debian's containerd sources
// (golang-github-containerd-containerd-dev, GOPATH mode), run as root in the
// guest next to a running server:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o target/containerd-suite.test ./crates/snapshotter/testsuite
//	THINLAYER_SNAPSHOTTER_SOCKET=/tmp/s.sock target/containerd-suite.test -test.root -test.v -test.parallel 1
//
// Every test of the suite gets the same server: each starts by removing
// every snapshot (children first) and its cleanup does the same, so the
// suite's parallel subtests must run one at a time (-test.parallel 1).
// Result in the TCG guest (containerd 1.6.20's suite): 20 of its 21
// subtests pass, 128LayersMount included; the 21st, Rename, is skipped by
// that suite itself for every snapshotter (its first line is t.Skip,
// because of overlay on some kernels). A block snapshotter must not skip
// it, so TestThinlayerRename below runs the same rename scenario against
// the service. TestThinlayerAuthority dials as grpc-go clients that send
// the socket path as `:authority` do.
package testsuite

import (
	"context"
	"fmt"
	"net"
	"os"
	"testing"
	"time"

	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/continuity/fs/fstest"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func socket(t *testing.T) string {
	sock := os.Getenv("THINLAYER_SNAPSHOTTER_SOCKET")
	if sock == "" {
		t.Fatal("set THINLAYER_SNAPSHOTTER_SOCKET to the socket of `thinlayer serve containerd`")
	}
	return sock
}

func connect(ctx context.Context, sock string) (snapshots.Snapshotter, *grpc.ClientConn, error) {
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(dctx, "unix://"+sock, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return nil, nil, err
	}
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinlayer"), conn, nil
}

// TestThinlayerRename: a parent snapshot holds a directory and two files;
// its child renames the directory, replaces a file by renaming a new one
// over it, and renames the other. A view of each committed snapshot must
// equal the same steps applied to a plain directory.
func TestThinlayerRename(t *testing.T) {
	ctx := context.Background()
	sn, conn, err := connect(ctx, socket(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	removeAll(ctx, sn)
	defer removeAll(ctx, sn)
	work := t.TempDir()
	expected := t.TempDir()
	steps := []fstest.Applier{
		fstest.Apply(
			fstest.CreateDir("/dir1", 0700),
			fstest.CreateDir("/somefiles", 0700),
			fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0644),
			fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0644),
		),
		fstest.Apply(
			fstest.Rename("/dir1", "/dir2"),
			fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0644),
			fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
			fstest.Rename("/somefiles/f2", "/somefiles/f3"),
		),
	}
	parent := ""
	for i, step := range steps {
		name := fmt.Sprintf("rename-%d", i)
		if err := onMounts(ctx, sn, name+"-active", parent, work, false, func(dir string) error { return step.Apply(dir) }); err != nil {
			t.Fatalf("snapshot %d: %v", i, err)
		}
		if err := sn.Commit(ctx, name, name+"-active"); err != nil {
			t.Fatalf("commit %d: %v", i, err)
		}
		if err := step.Apply(expected); err != nil {
			t.Fatal(err)
		}
		if err := onMounts(ctx, sn, name+"-view", name, work, true, func(dir string) error {
			return fstest.CheckDirectoryEqual(expected, dir)
		}); err != nil {
			t.Fatalf("snapshot %d differs from the expected tree: %v", i, err)
		}
		parent = name
	}
}

// onMounts prepares (or views) key on parent, mounts what the service
// returns, runs f on it, and unmounts; a view is removed again.
func onMounts(ctx context.Context, sn snapshots.Snapshotter, key, parent, work string, view bool, f func(string) error) (err error) {
	var ms []mount.Mount
	if view {
		ms, err = sn.View(ctx, key, parent)
		defer func() {
			if e := sn.Remove(ctx, key); e != nil && err == nil {
				err = e
			}
		}()
	} else {
		ms, err = sn.Prepare(ctx, key, parent)
	}
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(work, "mnt")
	if err != nil {
		return err
	}
	if err := mount.All(ms, dir); err != nil {
		return err
	}
	defer func() {
		if e := mount.UnmountAll(dir, 0); e != nil && err == nil {
			err = e
		}
	}()
	return f(dir)
}

func TestThinlayer(t *testing.T) {
	sock := socket(t)
	testsuite.SnapshotterSuite(t, "thinlayer", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		conn, err := grpc.DialContext(dctx, "unix://"+sock,
			grpc.WithInsecure(), grpc.WithBlock())
		if err != nil {
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinlayer")
		cleanup := func() error {
			removeAll(context.Background(), sn)
			return conn.Close()
		}
		// Start empty, whatever an earlier test left.
		removeAll(ctx, sn)
		return sn, cleanup, nil
	})
}

// removeAll removes every snapshot, leaves first, until none is left.
func removeAll(ctx context.Context, sn snapshots.Snapshotter) {
	for round := 0; round < 200; round++ {
		var infos []snapshots.Info
		_ = sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
			infos = append(infos, i)
			return nil
		})
		if len(infos) == 0 {
			return
		}
		parents := map[string]bool{}
		for _, i := range infos {
			parents[i.Parent] = true
		}
		for _, i := range infos {
			if !parents[i.Name] {
				_ = sn.Remove(ctx, i.Name)
			}
		}
	}
}

// TestThinlayerAuthority: grpc-go dialing `passthrough:///PATH` (or the bare
// path) sends the path as the HTTP/2 `:authority` ("run/..." or "/run/..."
// in this grpc-go), which h2 alone resets with PROTOCOL_ERROR (an Internal
// error here); the server must answer it: a Stat of a missing key is
// NotFound (or found), and a walk succeeds.
func TestThinlayerAuthority(t *testing.T) {
	ctx := context.Background()
	sock := socket(t)
	for _, target := range []string{"passthrough:///" + sock, sock} {
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		conn, err := grpc.DialContext(dctx, target, grpc.WithInsecure(), grpc.WithBlock(),
			grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			}))
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "thinlayer")
		for i := 0; i < 3; i++ {
			if _, err := sn.Stat(ctx, "thinlayer-authority-missing"); err != nil && !errdefs.IsNotFound(err) {
				t.Fatalf("%s: Stat: %v", target, err)
			}
			if err := sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }); err != nil {
				t.Fatalf("%s: Walk: %v", target, err)
			}
		}
		conn.Close()
	}
}
