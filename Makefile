# ReClo: `make run` starts the whole system locally, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint check-deploy bench clean

$(STAMP): requirements.txt $(wildcard agent/pyproject.toml)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	@if [ -f agent/pyproject.toml ]; then $(BIN)/pip install --quiet --disable-pip-version-check -e ./agent; fi
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m reclo_site.devstack

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py api_docs --check

# What `manage.py check --deploy` says with production-like settings.
check-deploy: $(STAMP)
	DEBUG=false RECLO_HTTPS=true ALLOWED_HOSTS=reclo.example.com \
	SECRET_KEY=$$($(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(50))') \
	$(BIN)/python manage.py check --deploy --fail-level WARNING

clean:
	rm -rf $(VENV) var
