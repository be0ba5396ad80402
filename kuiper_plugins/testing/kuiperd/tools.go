//go:build tools

// Package kuiperd pins eKuiper's engine command in this module, so that `go mod tidy` keeps its requirements
// and `go build github.com/lf-edge/ekuiper/v2/cmd/kuiperd` builds it with exactly these versions.
// Plugins meant for that engine are built in this same module (kuiper_plugins.testing copies it into the
// machine's build cache and each plugin's folder beside it), so they link the very package versions the
// engine does, as Go's plugin.Open demands.
package kuiperd

import _ "github.com/lf-edge/ekuiper/v2/cmd/kuiperd"
