"""The paper's study at laptop scale, above the library: the grid and its runs (`repro`), the
pinned corpus (`corpus`), the claims' rules (`claims`), the law variants compared
(`lawstudy`), the report (`report`) and its plots (`plots`). `qat-jax repro` runs it."""
