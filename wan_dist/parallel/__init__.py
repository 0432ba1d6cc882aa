"""The parallel layer: `ParallelDims` and its degree rules, the session and the World that owns every process
group, `parallelize_dit` and what it applies (kernels, sequence split, context cache), the guided noise over
the cfg axis, the handoff between stages, the VAE bands. Imports config and wan."""
