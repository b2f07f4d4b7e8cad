"""What is measured on a pair: barriers along a path, scans of many groups (resumable, with
sequential stopping), distances, random-direction robustness, the automatic choice of groups to
merge, and runs split over several processes."""
