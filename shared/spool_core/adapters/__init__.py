"""AWS implementations of the ports. They translate ``ClientError`` codes into domain exceptions."""
