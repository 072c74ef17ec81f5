// (kernels to come)
