# Rewrites a .cu file's kernel launches for cudasim (cmake -DIN=<file.cu> -DOUT=<file.cpp> -P):
#   kernel<<<grid, block, smem, stream>>>(args)  ->
#   ::cudasim::config(__FILE__, __LINE__, grid, block, smem, stream)
#       % [&](auto... cudasim_args) { kernel(cudasim_args...); } % ::cudasim::arguments(args)
# the one mechanical substitution of the launch syntax (hipify makes the same one); nothing else
# changes. The kernel is called as in CUDA, so a kernel template deduces its arguments. A #line
# directive keeps the original file name and line numbers: diagnostics and compiler errors point
# into IN.
# A launch configuration may hold one level of <...> (static_cast<unsigned>(n)); anything else
# left over is an error rather than a silent miss.
file(READ "${IN}" text)
# kernel: a name, optionally with one level of template arguments; then the configuration.
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;{}()]*>)?)<<<(([^<>]|<[^<>]*>)*)>>>"
       "::cudasim::config(__FILE__, __LINE__, \\3) % [&](auto... cudasim_args) { \\1(cudasim_args...); } % ::cudasim::arguments"
       text "${text}")
string(FIND "${text}" "<<<" left)
string(FIND "${text}" ">>>" right)
if(NOT left EQUAL -1 OR NOT right EQUAL -1)
  message(FATAL_ERROR "cudasim: a kernel launch in ${IN} could not be rewritten (at offset ${left}/${right})")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${text}")
file(RENAME "${OUT}.tmp" "${OUT}")
