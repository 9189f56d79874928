# Two commands on a fresh Linux machine (README, first screen):
#   make reproduce   set up .venv once (bash setup.sh), then all seven notebooks: PROFILE=smoke
#                    (default, about 3 min on 2 CPU cores), quick (under an hour), paper or official
#                    (a GPU); the executed notebooks and figures land in outputs/<profile>/
#   make test        set up .venv once, then README's test command
# setup.sh runs again only when requirements.lock or setup.sh is newer than its marker
# .venv/usfmae-deps.txt (written last, on success). USFMAE_DEPS=ranges make ... passes through.

PROFILE ?= smoke
SETUP_DONE := .venv/usfmae-deps.txt

.PHONY: setup reproduce test

setup: $(SETUP_DONE)

$(SETUP_DONE): requirements.lock setup.sh
	bash setup.sh

reproduce: $(SETUP_DONE)
	.venv/bin/usfmae reproduce --profile $(PROFILE)

test: $(SETUP_DONE)
	.venv/bin/python -m pytest -n auto --dist loadfile --durations=10
