# The Node and Go clients (clients/node, clients/go): toolchains, pinned dependencies and the
# code generated from protos/ (never committed). Included by the Makefile; `make clients`
# builds both, and tests/test_clients_node_go.py runs their suites against the real
# orchestrator with fake services behind it, and their `talk` examples against orchestrators
# that require an API key and mTLS. docs/clients.md explains it.

CLIENT_PROTOS := protos/voicemesh/v1/common.proto protos/voicemesh/v1/llm.proto protos/voicemesh/v1/orchestrator.proto
NODE_CLIENT   := clients/node
GO_CLIENT     := clients/go
# Go without a module proxy: GOPATH mode over Debian's Go sources (/usr/share/gocode, from the
# golang-*-dev packages). The client's import path voicemesh.dev/client is a link in a GOPATH
# of its own that points back at clients/go.
GO_GOPATH     := $(CURDIR)/$(GO_CLIENT)/.gopath
GO_PKG_DIR    := $(GO_GOPATH)/src/voicemesh.dev/client
GO_ENV        := GO111MODULE=off GOFLAGS= GOPROXY=off GOPATH=$(GO_GOPATH):/usr/share/gocode GOCACHE=$(GO_GOPATH)/cache
GO_DEBS       := golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev \
                 golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev

.PHONY: clients clients-node clients-go node-toolchain go-toolchain test-clients clients-clean clients-go-test

clients: clients-node clients-go

node-toolchain:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm; }

go-toolchain:
	@command -v go >/dev/null && command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null \
		&& command -v protoc-gen-go-grpc >/dev/null && [ -d /usr/share/gocode/src/google.golang.org/grpc ] \
		&& [ -d /usr/share/gocode/src/google.golang.org/protobuf ] || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(GO_DEBS); }

# Node: the lock file's exact versions, then proto/ and generated/ (npm run generate) and a
# type check of the declarations (npm run typecheck).
$(NODE_CLIENT)/node_modules/.stamp: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json | node-toolchain
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund
	touch $@

$(NODE_CLIENT)/generated/.stamp: $(CLIENT_PROTOS) $(NODE_CLIENT)/scripts/generate.js $(NODE_CLIENT)/src/proto.js \
		$(NODE_CLIENT)/src/index.d.ts $(NODE_CLIENT)/src/wav.d.ts $(NODE_CLIENT)/node_modules/.stamp
	cd $(NODE_CLIENT) && npm run --silent build
	touch $@

clients-node: $(NODE_CLIENT)/generated/.stamp

# Go: voicemeshv1/ by protoc-gen-go and protoc-gen-go-grpc (go generate, see gen.go), then vet
# and build of the package, its tests and cmd/talk.
$(GO_PKG_DIR):
	mkdir -p $(dir $@) && ln -sfn ../../.. $@

$(GO_CLIENT)/voicemeshv1/.stamp: $(CLIENT_PROTOS) $(GO_CLIENT)/gen.go $(wildcard $(GO_CLIENT)/*.go $(GO_CLIENT)/cmd/talk/*.go) \
		| go-toolchain $(GO_PKG_DIR)
	cd $(GO_PKG_DIR) && $(GO_ENV) go generate . && $(GO_ENV) go vet ./... && $(GO_ENV) go build ./...
	touch $@

clients-go: $(GO_CLIENT)/voicemeshv1/.stamp

# The Go suite against the orchestrator at $$VOICEMESH_ORCHESTRATOR_ADDR (a mesh with the fake
# services); the Node one is `npm --prefix clients/node test`.
clients-go-test: clients-go
	cd $(GO_PKG_DIR) && $(GO_ENV) PWD=$(GO_PKG_DIR) go test -count=1 -v .

# Both suites alone (the mesh comes from the pytest fixture; `make test` runs them too).
test-clients: install clients
	$(BIN)/python -m pytest -q tests/test_clients_node_go.py $(PYTEST_ARGS)

clients-clean:
	rm -rf $(NODE_CLIENT)/node_modules $(NODE_CLIENT)/proto $(NODE_CLIENT)/generated $(GO_CLIENT)/voicemeshv1 $(GO_GOPATH)
