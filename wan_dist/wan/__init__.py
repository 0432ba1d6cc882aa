"""The Wan model without parallelism: component loaders and header reads, the random-weight builders, the
schedulers, the denoising loop. Imports only config."""
