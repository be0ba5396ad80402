//go:build tools

// Package kuiperd pins eKuiper's engine command in this module, so that `go mod tidy` keeps its requirements
// and `go build github.com/lf-edge/ekuiper/v2/cmd/kuiperd` builds it with exactly these versions.
// The test-only plugins in the folders below are built in this same module, so they link the very package
// versions the engine does, as Go's plugin.Open demands.
package kuiperd

import _ "github.com/lf-edge/ekuiper/v2/cmd/kuiperd"
