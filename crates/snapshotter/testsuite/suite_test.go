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
// Result in the TCG guest (containerd 1.6.20's suite): all 21 subtests
// pass, 128LayersMount included; about 390 s with the boot.
package testsuite

import (
	"context"
	"os"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestThinlayer(t *testing.T) {
	sock := os.Getenv("THINLAYER_SNAPSHOTTER_SOCKET")
	if sock == "" {
		t.Fatal("set THINLAYER_SNAPSHOTTER_SOCKET to the socket of `thinlayer serve containerd`")
	}
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
