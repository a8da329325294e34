package voicemesh

// The contract's Go code (package voicemeshv1) is generated from protos/ by protoc-gen-go and
// protoc-gen-go-grpc at build time (`make clients`, which runs `go generate`); never committed,
// never edited by hand. The protos set no go_package, so the M options map each file here.
//go:generate sh -c "mkdir -p voicemeshv1 && protoc -I ../../protos --go_out=voicemeshv1 --go_opt=paths=source_relative --go-grpc_out=voicemeshv1 --go-grpc_opt=paths=source_relative --go_opt=Mvoicemesh/v1/common.proto=voicemesh.dev/client/voicemeshv1 --go_opt=Mvoicemesh/v1/llm.proto=voicemesh.dev/client/voicemeshv1 --go_opt=Mvoicemesh/v1/orchestrator.proto=voicemesh.dev/client/voicemeshv1 --go-grpc_opt=Mvoicemesh/v1/common.proto=voicemesh.dev/client/voicemeshv1 --go-grpc_opt=Mvoicemesh/v1/llm.proto=voicemesh.dev/client/voicemeshv1 --go-grpc_opt=Mvoicemesh/v1/orchestrator.proto=voicemesh.dev/client/voicemeshv1 voicemesh/v1/common.proto voicemesh/v1/llm.proto voicemesh/v1/orchestrator.proto && mv voicemeshv1/voicemesh/v1/*.go voicemeshv1/ && rm -r voicemeshv1/voicemesh"
