# Cross-compile crossvit_classify for 64-bit ARM Linux with Debian's cross compiler
# (g++-aarch64-linux-gnu) against an arm64 root filesystem (libpng, libjpeg-turbo, OpenSSL and
# their headers) and the aarch64 executorch wheel:
#
#   cmake -S examples/executorch_cpp -B build/executorch_cpp_aarch64 \
#         -DCMAKE_TOOLCHAIN_FILE=examples/executorch_cpp/cmake/aarch64-linux-gnu.cmake \
#         -DCROSSVIT_SYSROOT=/path/to/arm64/root -Dexecutorch_DIR=/path/to/aarch64/executorch/share/cmake
#
# scripts/build_cpp_example.sh --arch aarch64 does exactly this with the root and wheel that
# scripts/install_arm_deps.sh unpacks under build/aarch64/. Any arm64 root works: a board's
# filesystem copied over, a Debian/Ubuntu arm64 image, or Debian's .debs unpacked with dpkg -x.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CROSSVIT_CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "prefix of the cross compiler's tools")
set(CMAKE_C_COMPILER "${CROSSVIT_CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${CROSSVIT_CROSS_PREFIX}g++")

set(CROSSVIT_SYSROOT "" CACHE PATH "the arm64 root filesystem (libraries and headers of the target)")
if(NOT CROSSVIT_SYSROOT OR NOT EXISTS "${CROSSVIT_SYSROOT}/usr/include")
  message(FATAL_ERROR "aarch64 toolchain: set -DCROSSVIT_SYSROOT to an arm64 root filesystem with /usr/include "
                      "(scripts/install_arm_deps.sh unpacks one into build/aarch64/sysroot)")
endif()
set(CMAKE_SYSROOT "${CROSSVIT_SYSROOT}")
# try_compile projects see the same settings
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES CROSSVIT_SYSROOT CROSSVIT_CROSS_PREFIX)

# libraries and headers from the target root only, never the host's; packages (the executorch
# config) from where -Dexecutorch_DIR points as well
set(CMAKE_FIND_ROOT_PATH "${CROSSVIT_SYSROOT}")
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
