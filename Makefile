# Developer entry points. `make demo` and `make test` work on a fresh Debian
# machine: they install what is missing (tools/deps.sh) and build first.
LUA        ?= lua5.4
CC         ?= gcc
PG_INCDIR  := $(shell pg_config --includedir 2>/dev/null)
PG_LIBDIR  := $(shell pg_config --libdir 2>/dev/null)
LUA_INCDIR ?= /usr/include/lua5.4
CFLAGS     ?= -O2 -g
WARN       := -std=c99 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
SRC        := $(wildcard src/*.c)
BUILD      ?= build
SO         := $(BUILD)/msgbus/core.so

export LUA_PATH  := $(CURDIR)/lua/?.lua;$(CURDIR)/lua/?/init.lua;$(CURDIR)/spec/?.lua;;
export LUA_CPATH := $(CURDIR)/$(BUILD)/?.so;;

.PHONY: all deps demo test check lint asan valgrind fuzz bench clean

all: $(SO)

$(SO): $(SRC) src/msgbus.h
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared -I$(LUA_INCDIR) -I$(PG_INCDIR) -o $@ $(SRC) -L$(PG_LIBDIR) -lpq

deps:
	@sh tools/deps.sh

# The demo runs on `msgbus dev up` clusters in a fresh folder, removed at the end.
demo: deps
	@$(MAKE) --no-print-directory all
	@dir=$$(mktemp -d) && chmod 755 "$$dir" && \
	  trap '$(LUA) bin/msgbus dev down --dir "$$dir/dev" >/dev/null 2>&1; rm -rf "$$dir"' EXIT && \
	  $(LUA) bin/msgbus dev up --dir "$$dir/dev" && echo && \
	  MSGBUS_DEV_DIR="$$dir/dev" $(LUA) examples/demo.lua && \
	  $(LUA) bin/msgbus dev down --dir "$$dir/dev"

# The whole suite: C warnings under gcc and clang, lint, then every spec.
test: deps
	@$(MAKE) --no-print-directory check

check: all lint
	$(CC) $(WARN) -fsyntax-only -I$(LUA_INCDIR) -I$(PG_INCDIR) $(SRC)
	clang $(WARN) -fsyntax-only -I$(LUA_INCDIR) -I$(PG_INCDIR) $(SRC)
	$(LUA) spec/run.lua $(SPECS)

lint:
	luacheck -q $(wildcard lua spec examples bench bin/msgbus)

# The specs again with the C core built under AddressSanitizer and UBSan (the
# sanitizer runtime is preloaded into the Lua process that runs busted).
asan:
	$(MAKE) BUILD=build-asan CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" all
	LUA_CPATH="$(CURDIR)/build-asan/?.so;;" ASAN_OPTIONS=detect_leaks=0 \
	  MSGBUS_RUNNER="env LD_PRELOAD='$$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libubsan.so)' $(LUA) /usr/bin/busted --cpath=build-asan/?.so" \
	  $(LUA) spec/run.lua $(SPECS)

# Fuzzing (fuzz/README.md): fuzz/core_fuzz.c calls the C core's functions with
# arguments of every Lua type under libFuzzer, ASan and UBSan, for FUZZ_SECONDS,
# starting from a copy of fuzz/corpus (what it adds stays in build/fuzz). A crash,
# a sanitizer report, a leak or a broken invariant fails the build; the input that
# caused it is saved as build/fuzz/crash-* (or leak-, timeout-, oom-).
FUZZ_SECONDS ?= 60
FUZZ_DIR     := build/fuzz
FUZZ_CFLAGS  := -g -O1 -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined

$(FUZZ_DIR)/core_fuzz: fuzz/core_fuzz.c $(SRC) src/msgbus.h
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) $(WARN) -I$(LUA_INCDIR) -I$(PG_INCDIR) -o $@ fuzz/core_fuzz.c $(SRC) \
	  -llua5.4 -L$(PG_LIBDIR) -lpq

fuzz: $(FUZZ_DIR)/core_fuzz
	rm -rf $(FUZZ_DIR)/corpus && mkdir -p $(FUZZ_DIR)/corpus && cp fuzz/corpus/* $(FUZZ_DIR)/corpus/
	UBSAN_OPTIONS=print_stacktrace=1 $(FUZZ_DIR)/core_fuzz -max_total_time=$(FUZZ_SECONDS) -timeout=30 \
	  -dict=fuzz/core.dict -artifact_prefix=$(FUZZ_DIR)/ -print_final_stats=1 $(FUZZ_DIR)/corpus

# The specs with the Lua process that loads the C core under valgrind.
valgrind: all
	MSGBUS_RUNNER="valgrind --quiet --error-exitcode=99 --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite $(LUA) /usr/bin/busted" \
	  $(LUA) spec/run.lua $(SPECS)

bench: deps all
	$(LUA) bench/run.lua

clean:
	rm -rf build build-asan *.o src/*.o src/*.so msgbus/core.so
