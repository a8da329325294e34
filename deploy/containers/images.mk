# Container images, one per service (docs/containers.md). Included by the Makefile, which
# defines BIN (the venv's bin), `install` and `wheels`.
#
#   make images          build the six images with podman (a rebuild with nothing changed only tags)
#   make images IMAGES_ARGS="stt --save"   one image, also written as an OCI archive
#   make containers-apt  the Debian packages that build and run them: podman, runc, mmdebstrap

IMAGES_CONF := $(CURDIR)/deploy/containers/containers.conf
IMAGES_ARGS ?=

.PHONY: images containers-apt

images: wheels install containers-apt
	CONTAINERS_CONF=$(IMAGES_CONF) $(BIN)/python deploy/containers/build.py $(IMAGES_ARGS)

# Installed as root, or through sudo. podman as root with --network=host needs nothing more
# (its Recommends, installed with it, cover the other network modes and rootless use).
containers-apt:
	@command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
		podman runc mmdebstrap; }
