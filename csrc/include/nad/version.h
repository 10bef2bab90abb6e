#pragma once
// The version of nad-ext's C++ API (the Python package's version, pyproject.toml; CMake refuses
// to configure when the two differ). nad::version() in nad.h is the version of the library a
// program runs with; nad.h checks that the two agree before the first operator call.
#define NAD_VERSION_MAJOR 0
#define NAD_VERSION_MINOR 1
#define NAD_VERSION_PATCH 0
#define NAD_VERSION_STRING "0.1.0"
// MAJOR * 10000 + MINOR * 100 + PATCH, for #if comparisons.
#define NAD_VERSION_NUMBER (NAD_VERSION_MAJOR * 10000 + NAD_VERSION_MINOR * 100 + NAD_VERSION_PATCH)
