"""voicemesh's gRPC contract, version 1: the .proto files here and the stubs the build generates from them."""
