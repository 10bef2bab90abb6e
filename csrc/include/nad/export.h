#pragma once
// NAD_API marks what libnad exports: the library is compiled with hidden visibility (CMake's
// CXX_VISIBILITY_PRESET hidden), so that only the C++ API declared in these headers is visible
// to programs and to other libraries of the process (nad_ext._C, built from the same sources, then
// never interposes libnad's internals, nor libnad its). The operators need no exported symbol:
// they are reached through the dispatcher.
#if defined(_WIN32)
#if defined(NAD_BUILDING_LIBRARY)
#define NAD_API __declspec(dllexport)
#else
#define NAD_API __declspec(dllimport)
#endif
#else
#define NAD_API __attribute__((visibility("default")))
#endif
