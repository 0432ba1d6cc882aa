"""The plan: `prepare` (the only collectives and file reads before loading), the checks, `resolve` (pure) to a
`JobPlan`, the planner above it, the memory and cost models. Uses the parallel layer's pure rules; imports
config, wan and parallel."""
