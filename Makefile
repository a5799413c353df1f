# Two commands: `make run` (set up, build what is missing, boot examples/hello.json in a VM)
# and `make test`. `make sandbox` runs the same example without a VM.
PY := .venv/bin/python

.PHONY: setup run sandbox image test
setup: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -e '.[test]'
	touch $@

image: setup
	init/build

run: image
	.venv/bin/tether vm examples/hello.json --image build/

sandbox: setup
	.venv/bin/tether sandbox examples/hello.json

test: setup
	$(PY) -m pytest -q -rs; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc
