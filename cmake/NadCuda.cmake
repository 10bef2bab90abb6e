# CUDA support of the nad build, in two steps around find_package(Torch).

# Before find_package(Torch): point torch's FindCUDA and CMake at the toolkit the way setup.py
# does (CUDA_HOME, CUDA_PATH, then /usr/local/cuda: where nvcc on PATH is a wrapper script, the
# guess from PATH is wrong), and turn CMAKE_CUDA_ARCHITECTURES into torch's TORCH_CUDA_ARCH_LIST
# (torch ignores the former and would otherwise build for every architecture it knows).
macro(nad_find_cuda_toolkit)
  if(NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
    foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
      if(_root AND EXISTS "${_root}/bin/nvcc")
        set(CUDA_TOOLKIT_ROOT_DIR "${_root}" CACHE PATH "CUDA toolkit used by torch and nad")
        break()
      endif()
    endforeach()
  endif()
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND CUDA_TOOLKIT_ROOT_DIR)
    set(CMAKE_CUDA_COMPILER "${CUDA_TOOLKIT_ROOT_DIR}/bin/nvcc" CACHE FILEPATH "nvcc")
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "GPU architectures of the CUDA kernels")
  endif()
  set(NAD_CUDA_ARCHITECTURES ${CMAKE_CUDA_ARCHITECTURES})
  if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(TORCH_CUDA_ARCH_LIST "")
    foreach(_arch ${NAD_CUDA_ARCHITECTURES})
      string(REGEX REPLACE "^([0-9]+)([0-9])(a?)(-real|-virtual)?$" "\\1.\\2\\3" _arch "${_arch}")
      list(APPEND TORCH_CUDA_ARCH_LIST "${_arch}")
    endforeach()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
endmacro()

# After find_package(Torch): decide NAD_WITH_CUDA (a CUDA compiler and a CUDA build of torch).
macro(nad_setup_cuda)
  if(CMAKE_CUDA_COMPILER AND CAFFE2_USE_CUDA)
    set(_nad_cuda_default ON)
  else()
    set(_nad_cuda_default OFF)
  endif()
  option(NAD_WITH_CUDA "Build the CUDA kernels" ${_nad_cuda_default})
  if(NAD_WITH_CUDA)
    if(NOT _nad_cuda_default)
      message(FATAL_ERROR "NAD_WITH_CUDA=ON but no CUDA build is possible: CUDA compiler "
        "'${CMAKE_CUDA_COMPILER}', torch built with CUDA: '${CAFFE2_USE_CUDA}'")
    endif()
    enable_language(CUDA)
    set(CMAKE_CUDA_STANDARD 20)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)  # CMake < 3.26 does not know nvcc's flag
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    endif()
    # A minimal toolkit lacks the cuSPARSE/cuBLAS headers that torch's CUDA headers include; the
    # nvidia-* wheels next to a pip torch carry them (setup.py does the same).
    set(NAD_CUDA_EXTRA_INCLUDE_DIRS "")
    if(NOT EXISTS "${CUDAToolkit_INCLUDE_DIRS}/cusparse.h")
      file(GLOB _found "${TORCH_INSTALL_PREFIX}/../nvidia/*/include/cusparse.h")
      if(_found)
        list(GET _found 0 _first)
        get_filename_component(_dir "${_first}" DIRECTORY)
        get_filename_component(_dir "${_dir}" REALPATH)
        set(NAD_CUDA_EXTRA_INCLUDE_DIRS "${_dir}")
      endif()
    endif()
    message(STATUS "nad: CUDA kernels ON (architectures ${NAD_CUDA_ARCHITECTURES}; "
                   "extra includes: ${NAD_CUDA_EXTRA_INCLUDE_DIRS})")
  else()
    message(STATUS "nad: CUDA kernels OFF")
  endif()
endmacro()

# The flags torch.utils.cpp_extension gives nvcc, so both builds compile the kernels alike.
function(nad_configure_cuda_target target)
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${NAD_CUDA_ARCHITECTURES}")
  target_compile_definitions(${target} PRIVATE NAD_WITH_CUDA=1)
  target_include_directories(${target} PRIVATE ${NAD_CUDA_EXTRA_INCLUDE_DIRS})
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
    --expt-relaxed-constexpr -lineinfo>)
endfunction()
