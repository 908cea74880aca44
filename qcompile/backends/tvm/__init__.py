"""TVM (Relax) backend: IR -> Relax -> scheduled TIR -> shared library, for x86 and arm64."""
