# Two commands: `make run` (set up, build what is missing, boot examples/hello.json in a VM)
# and `make test`. Both start with scripts/install-deps (the Debian packages: installed as
# root, else the apt-get line to run is printed) and the venv (.venv, the project editable
# with its PyPI dependencies). `make sandbox` runs the example without a VM.
# `make test-strict` fails, rather than skips, tests whose tool, root or kernel facility is
# missing (as CI does, with CI=true), apart from the allow-list in tests/helpers.py.
PY := .venv/bin/python
# Tools such as mkfs.ext4 live in sbin, which a non-root user's PATH lacks.
export PATH := $(PATH):/usr/sbin:/sbin
PYTEST := $(PY) -m pytest -q -rfEs

.PHONY: deps setup run sandbox image test test-strict
deps:
	scripts/install-deps

setup: deps .venv/.installed
# The C extensions are built by the editable install: a change to one reinstalls.
.venv/.installed: pyproject.toml setup.py $(wildcard tether/*.c extraconfig/backdoor/*.c) | deps
	python3 -m venv .venv
	.venv/bin/pip install -q -e '.[test]'
	touch $@

image: setup
	init/build

run: image
	.venv/bin/tether vm examples/hello.json --image build/

sandbox: setup
	.venv/bin/tether sandbox examples/hello.json

# pytest exits 5 when it collected nothing: that is not a failure.
test: setup
	$(PYTEST); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-strict: setup
	TETHER_TEST_STRICT=1 $(PYTEST); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
