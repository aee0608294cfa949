"""The parts of `torch.ops.fire.repair` behind `fire_repair.ops`, one job a module:

- `validate`: the public arguments' types, devices and shapes, and the named errors;
- `layout`: x as the kernels' rows (flattened or per position) without a copy, and back;
- `backend`: the one backend decision (FIRE_BACKEND, `set_backend`), which the C++ op consults;
- `inline`: what CPU calls compile to under torch.compile / export (plain maths or the kernel);
- `body`: the ops' body, layout then dispatch to the meta shapes, Triton, plain maths or C++;
- `backward`: the autograd formulas of the two ops and of `fire::_repair_grad`.

`fire_repair.ops` defines the ops from these and is the public surface.
"""
